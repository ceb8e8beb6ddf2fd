"""Skipping that CI does not allow: outside CI a missing optional resource (the default model when it
cannot be fetched) skips a test, but under CI (`CI` set to a true value, as `.ci/run` does) the same
absence is a failure, so a broken setup can never pass as a green run of skipped tests."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def skip_or_fail(reason: str):
    """pytest.fail(reason) under CI, else pytest.skip(reason). Never returns."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a test cannot skip for this in CI)", pytrace=False)
    pytest.skip(reason)
