"""Shared test helpers: where the read-only fixtures live (`<root>/../shared`), and the `--full-demo` option."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full-demo",
        action="store_true",
        help="also run the tests marked full_demo: the whole `mllm demo` of seed 0, the recipe's and `--profile "
        "grounded_large`'s (tests/test_demo_full.py; the recipe ~15 minutes on 2 cores with avx512_bf16, the profile "
        "31-45 on a 2-core AVX2-only EPYC, so not part of `make test`)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the `full_demo` tests unless `--full-demo` is given: `make test-full-demo` runs them."""
    if config.getoption("--full-demo"):
        return
    deselected = [item for item in items if item.get_closest_marker("full_demo")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("full_demo")]


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


@pytest.fixture(scope="session")
def small_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture checkpoint with a processor that keeps small images small (56 px, one slice), for fast
    training tests: a 56x56 image becomes 16 patches instead of being upscaled to 448 px."""
    from mllm.model.loading import copy_model_dir

    return copy_model_dir(
        tiny_model_dir, tmp_path_factory.mktemp("small_model"), scale_resolution=56, max_slice_nums=1
    )
