"""Hypothesis profiles: `ci` runs every property at full strength (what CI and `make
test` use); `dev`, the default elsewhere, runs a fifth of the examples so a developer's
loop stays short. Choose with HYPOTHESIS_PROFILE."""

from __future__ import annotations

import os

from hypothesis import settings

FULL = 100
settings.register_profile("ci", max_examples=FULL, print_blob=True)
settings.register_profile("dev", max_examples=FULL // 5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def examples(full: int) -> int:
    """`full` examples under the ci profile, the same share of them under another."""
    current = settings.default
    share = current.max_examples if current is not None else FULL
    return max(5, full * share // FULL)
