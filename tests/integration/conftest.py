"""Fixtures the integration tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.xds_stream import Stream


@pytest.fixture
async def streams() -> AsyncIterator[list[Stream]]:
    """A test's ADS streams (tests/support/xds_stream.py), closed when it ends."""
    opened: list[Stream] = []
    yield opened
    for s in opened:
        await s.close()
