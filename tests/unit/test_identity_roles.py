"""Roles, grants and who may mint what."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane.domain.kernel.errors import InvalidArgument, PermissionDenied
from controlplane.domain.kernel.secrets import api_key_id, new_api_key
from controlplane.domain.model.roles import EVERY_PROJECT, Grant, Principal, Role, validate_grants

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def principal(expires_at: datetime | None = None, **grants: Role) -> Principal:
    return Principal("k", {("*" if p == "all" else p): r for p, r in grants.items()}, expires_at)


def test_roles_include_lower_ones_and_global_grants_count_everywhere() -> None:
    p = principal(a=Role.OPERATOR, all=Role.READER)
    assert p.allows(Role.READER, {"a"}) and p.allows(Role.OPERATOR, {"a"})
    assert not p.allows(Role.ADMIN, {"a"})
    assert p.allows(Role.READER, {"b"}) and not p.allows(Role.OPERATOR, {"b"})
    # A global operation needs a global grant of the role.
    assert p.allows(Role.READER, set()) and not p.allows(Role.OPERATOR, set())
    assert not principal(a=Role.ADMIN).allows(Role.READER, set())
    assert principal(all=Role.ADMIN).allows(Role.ADMIN, set())


def test_minting_stays_within_the_minter() -> None:
    admin_a = principal(NOW + timedelta(days=1), a=Role.ADMIN, b=Role.READER)
    admin_a.check_can_mint([Grant("a", Role.ADMIN)], NOW + timedelta(hours=1))
    for grants in ([Grant("b", Role.READER)], [Grant(EVERY_PROJECT, Role.READER)], [Grant("c", Role.READER)]):
        with pytest.raises(PermissionDenied):
            admin_a.check_can_mint(grants, NOW + timedelta(hours=1))
    with pytest.raises(PermissionDenied, match="outlive"):
        admin_a.check_can_mint([Grant("a", Role.READER)], NOW + timedelta(days=2))
    with pytest.raises(PermissionDenied, match="outlive"):
        admin_a.check_can_mint([Grant("a", Role.READER)], None)
    principal(all=Role.ADMIN).check_can_mint([Grant(EVERY_PROJECT, Role.ADMIN)], None)


def test_grants_are_validated() -> None:
    assert validate_grants([Grant("b", Role.READER), Grant("a", Role.ADMIN)])[0].project == "a"
    for bad in ([], [Grant("A B", Role.READER)], [Grant("a", Role.READER), Grant("a", Role.ADMIN)]):
        with pytest.raises(InvalidArgument):
            validate_grants(bad)
    assert Role.parse("Operator") is Role.OPERATOR
    with pytest.raises(InvalidArgument):
        Role.parse("root")


def test_api_keys_carry_their_id() -> None:
    key_id, secret = new_api_key()
    assert api_key_id(secret) == key_id and len(secret) > 50
    for bad in ("", "cpk_", "cpk_xyz_abc", "cpk_0123456789abcdefX", "eyJhbGciOi", secret.upper()):
        assert api_key_id(bad) is None
