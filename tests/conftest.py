"""Shared test helpers: where the read-only fixtures live (`<root>/../shared`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test fixture not found: looked for {path} (the shared/ folder beside the project root)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The MiniCPM-V-2.6-layout checkpoint with tiny random weights and the reference outputs."""
    return _require(SHARED / "fixtures" / "minicpmv26_tiny")


@pytest.fixture(scope="session")
def chair_fixture_dir() -> Path:
    return _require(SHARED / "fixtures" / "chair")


@pytest.fixture(scope="session")
def nltk_data_dir() -> Path:
    return _require(SHARED / "nltk_data")
