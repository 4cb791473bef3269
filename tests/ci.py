"""What a test needs that CI must have: skipped on a developer's machine without it, a failure in CI."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true")  # .ci/run runs with CI=true


def import_or_skip_outside_ci(module: str, reason: str):
    """The module, or a skip here; in CI (CI=true, as .ci/run runs) a missing test tool fails instead, so a
    broken install cannot turn tests into silent skips."""
    if IN_CI:
        try:
            return __import__(module, fromlist=["_"])
        except ImportError as e:
            pytest.fail(f"{reason}, and CI must run it: {e}", pytrace=False)
    return pytest.importorskip(module, reason=reason)
