"""docs/security.md carries the table of RPC x caller this server enforces, generated
from `auth.POLICY` and the request scopes; this test fails when the document is stale.

Regenerate it with `python -m tests.unit.test_identity_policy_doc`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

from controlplane.domain.model.roles import Role
from controlplane.rpc.auth import POLICY, ROLE_FOR, Rule
from controlplane.rpc.scope import GLOBAL_METHODS, PROJECT_FIELD
from tests.support.rpcs import all_rpcs

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
START, END = "<!-- policy-table:start -->", "<!-- policy-table:end -->"
_IDS = {"node_id", "key_id"}


def scoped(path: str, method: MethodDescriptor) -> bool:
    """Whether the request names a project (or a resource that belongs to one)."""
    if path in GLOBAL_METHODS:
        return False
    project_field = PROJECT_FIELD.get(path, "project")
    for field in method.input_type.fields:
        if field.type == FieldDescriptor.TYPE_STRING and (field.name == project_field or field.name in _IDS):
            return True
        inner = field.message_type
        if (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and inner is not None
            and "project" in inner.fields_by_name
        ):
            return True
    return False


def cell(rule: Rule, caller: str, project_scoped: bool) -> str:
    if rule is Rule.PUBLIC:
        return "yes"
    if caller == "anonymous":
        return "—"
    if caller == "node":
        if rule is Rule.NODE_CREDENTIAL:
            return "credential"
        if rule is Rule.NODE_STREAM:
            return "own, credential, token or certificate"
        return "own" if rule in (Rule.NODE, Rule.NODE_OR_READ) else "—"
    if rule in (Rule.NODE, Rule.NODE_CREDENTIAL, Rule.NODE_STREAM):
        return "—"
    if Role[caller.upper()] < ROLE_FOR[rule]:
        return "—"
    return "yes" if project_scoped else "`*` only"


def table() -> str:
    rows = [
        "| RPC | rule | anonymous | node | reader | operator | admin |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rpc in all_rpcs():
        rule = POLICY[rpc.path]
        project_scoped = scoped(rpc.path, rpc.descriptor)
        service = rpc.path.split("/")[1].split(".")[-1]
        cells = [cell(rule, c, project_scoped) for c in ("anonymous", "node", "reader", "operator", "admin")]
        rows.append(f"| `{service}/{rpc.name}` | {rule.value} | " + " | ".join(cells) + " |")
    for path, rule in sorted(POLICY.items()):
        if path.startswith("/envoy."):
            name = path.lstrip("/").split(".")[-1]
            cells = [cell(rule, c, False) for c in ("anonymous", "node", "reader", "operator", "admin")]
            rows.append(f"| `{name}` (Envoy's) | {rule.value} | " + " | ".join(cells) + " |")
    for path, rule in sorted(POLICY.items()):
        if path.startswith("/grpc."):
            name = path.lstrip("/")
            rows.append(f"| `{name}` | {rule.value} | yes | yes | yes | yes | yes |")
    return "\n".join(rows)


def rendered(text: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    return pattern.sub(lambda _: f"{START}\n{table()}\n{END}", text)


def test_the_security_doc_shows_the_policy_in_force() -> None:
    text = DOC.read_text()
    assert START in text and END in text
    assert rendered(text) == text, "docs/security.md is stale: python -m tests.unit.test_identity_policy_doc"


def test_every_rpc_has_a_rule() -> None:
    missing = [r.path for r in all_rpcs() if r.path not in POLICY]
    assert not missing, missing
    # ...and no rule names an RPC that does not exist (a typo would leave the real one unguarded).
    served = {r.path for r in all_rpcs()}
    stale = [p for p in POLICY if not p.startswith(("/grpc.", "/envoy.")) and p not in served]
    assert not stale, stale


def test_envoy_rules_name_envoy_methods() -> None:
    # Envoy's services (docs/xds.md) are not ours: checked against their descriptors.
    import controlplane.rpc.xds  # noqa: F401  (registers Envoy's services' descriptors)

    pool = descriptor_pool.Default()
    for path in (p for p in POLICY if p.startswith("/envoy.")):
        service, method = path.lstrip("/").split("/")
        assert pool.FindServiceByName(service).methods_by_name[method] is not None, path


if __name__ == "__main__":
    DOC.write_text(rendered(DOC.read_text()))
    sys.exit(0)
