"""Page tokens: opaque to clients, and anything a client makes up is INVALID_ARGUMENT
naming the field, never an internal error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.domain.audit.trail import _seq
from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import InvalidArgument


@given(st.text())
def test_a_position_survives_the_round_trip(position: str) -> None:
    assert validation.decode_page_token(validation.encode_page_token(position)) == position


@given(st.text())
def test_made_up_tokens_are_invalid_arguments(token: str) -> None:
    try:
        validation.decode_page_token(token)
    except InvalidArgument as e:
        assert e.field == "page_token"


@pytest.mark.parametrize("token", ["%%%", "not base64!", "/w=="])
def test_garbage_names_the_field(token: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validation.decode_page_token(token)
    assert raised.value.field == "page_token"


@pytest.mark.parametrize("position", ["0", "-3", "abc", "²", "1.5"])
def test_an_audit_position_is_a_positive_sequence_number(position: str) -> None:
    with pytest.raises(InvalidArgument):
        _seq(position)
    assert _seq("") == 0 and _seq("42") == 42
