"""Unit tests' shared fixtures."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def thaw() -> Iterator[None]:
    """The hub freezes the heap when it settles; never leave the test process frozen."""
    yield
    gc.unfreeze()
