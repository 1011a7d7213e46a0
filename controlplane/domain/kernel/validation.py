"""Field checks shared by several domain services."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping

from controlplane.domain.kernel.errors import InvalidArgument

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$")
MAX_ANNOTATIONS = 32
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def digest(value: str, field: str = "digest") -> str:
    if not _DIGEST.match(value):
        raise InvalidArgument(
            f"{value[:80]!r} is not a digest of the form sha256:<64 hex digits>", field=field
        )
    return value


def version_label(value: str, field: str = "version") -> str:
    if value and not _VERSION.match(value):
        raise InvalidArgument(
            f"{value[:80]!r} must be 1-63 letters, digits, '.', '_', '+' or '-'", field=field
        )
    return value


def annotation_map(values: Mapping[str, str], field: str = "annotations") -> dict[str, str]:
    if len(values) > MAX_ANNOTATIONS:
        raise InvalidArgument(f"at most {MAX_ANNOTATIONS} entries", field=field)
    for key, value in values.items():
        if not key or len(key) > 63 or len(value) > 256:
            raise InvalidArgument(
                "keys must be 1-63 and values at most 256 characters", field=f"{field}[{key!r}]"
            )
    return dict(values)


def bounded(value: float, low: float, high: float, field: str) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(f"{value} is outside [{low}, {high}]", field=field)
    return value


def page_size(value: int, field: str = "page_size") -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be between 0 and {MAX_PAGE_SIZE}", field=field)
    return value or DEFAULT_PAGE_SIZE


def encode_page_token(position: str) -> str:
    """An opaque page token for `position` (the last key of the page)."""
    return base64.urlsafe_b64encode(position.encode()).decode()


def decode_page_token(token: str) -> str:
    """The position in a token from `encode_page_token`; "" for no token."""
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad_page_token() from None


def bad_page_token() -> InvalidArgument:
    return InvalidArgument("not a token this server issued", field="page_token")
