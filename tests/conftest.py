"""Shared test helpers: where the parity fixtures live, and how a missing one is treated."""
import os
from pathlib import Path

from vrtspike_jax import runtime

runtime.prefer_memory_scheduler_on_cpu()   # as every entry point does, before any test starts jax

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def rel_l2(ours, reference) -> float:
    """||ours - reference|| / ||reference|| in float64: the parity measure of every fixture test."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def btchw_to_ours(x):
    """PyTorch video layout [B, T, C, H, W] -> ours [B, T, H, W, C] (a jax array)."""
    import jax.numpy as jnp
    return jnp.asarray(np.asarray(x).transpose(0, 1, 3, 4, 2))


def ours_to_btchw(x) -> np.ndarray:
    """Ours [B, T, H, W, C] -> PyTorch [B, T, C, H, W] (NumPy)."""
    return np.asarray(x).transpose(0, 1, 4, 2, 3)


def fixtures_dir() -> Path:
    """`$VRTSPIKE_FIXTURES`, else `../shared/fixtures` beside the checkout."""
    env = os.environ.get("VRTSPIKE_FIXTURES")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "fixtures")


def _running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"parity fixture {path} not found (set VRTSPIKE_FIXTURES to the fixtures folder)"
        if _running_in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def fixture_file():
    """Returns `fixture_file(name) -> Path` of a parity fixture (skip locally / fail under CI when missing)."""
    return lambda name: _require(fixtures_dir() / name)


@pytest.fixture(scope="session")
def load_fixture():
    """Returns a loader `load_fixture(name) -> np.lib.npyio.NpzFile`.

    A missing fixture skips the test locally and fails it under CI (CI=true).
    """
    cache = {}

    def _load(name: str):
        path = _require(fixtures_dir() / name)
        if name not in cache:
            cache[name] = np.load(path)
        return cache[name]

    return _load
