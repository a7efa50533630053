"""Shared test helpers: where the parity fixtures live, and how a missing one is treated; the test session's XLA
settings and compilation cache; how pytest-xdist's two workers share the suite."""
import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import helpers as testing
from vrtspike_jax import runtime

# The test session's XLA settings, before any test starts jax: helpers.TEST_XLA_FLAGS, then the CPU flags every entry
# point sets (runtime.set_cpu_xla_flags: XLA's own convolution kernels, the memory scheduler).
os.environ["XLA_FLAGS"] = testing.with_xla_flags(os.environ.get("XLA_FLAGS", ""))
runtime.set_cpu_xla_flags()

# One persistent compilation cache for the whole session: this process, the xdist workers (they inherit the
# environment of the process that starts them) and every subprocess (helpers.subprocess_env copies the environment).
# A cache folder of the caller's own (JAX_COMPILATION_CACHE_DIR set before pytest starts) is used as it is.
_CACHE_VAR = "JAX_COMPILATION_CACHE_DIR"
if not os.environ.get(_CACHE_VAR):
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="vrtspike-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)   # by the process that made it

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])   # in case jax read its environment earlier

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


@pytest.fixture(scope="session")
def xla_cache_dir() -> Path:
    """The session's persistent compilation cache (for configs' compilation_cache_dir: the same folder)."""
    return Path(os.environ[_CACHE_VAR])


@pytest.fixture(scope="session")
def tiny_run_paths(tmp_path_factory, xla_cache_dir):
    """What the tiny training runs of a test process share: the tiny embedded dataset (built by the first run that
    needs it) and the session's compilation cache."""
    return {"embedded": tmp_path_factory.getbasetemp() / "train_embedded", "cache": xla_cache_dir}


# ------------------------------------------------------------------------------------------- pytest-xdist

# `pytest -q` runs the suite on two pytest-xdist workers (pytest.ini: -n 2 --dist loadgroup --no-loadscope-reorder).
# A module's tests that share a module- or class-scoped fixture (a training run, a comparison, a fixture model) go to
# one worker together, so the fixture is made once; every other test is scheduled on its own. The workers take the
# work in collection order, so the longest units come first (measured, slowest first): otherwise one worker may
# start a 5-minute test while the other has nothing left.
SLOWEST_FIRST = (
    "tests/test_train_run.py",                   # the reference run and the five tests that read it: 12 min
    "tests/test_train_run.py::test_warm_up_spike_dropout_ema_and_lora_resume_exactly_across_the_unfreeze",
    "tests/test_train_sharding.py",
    "tests/test_compare_script.py",
    "tests/test_main_quickstart.py",
    "tests/test_param_groups.py::test_frozen_groups_stay_bit_identical_and_the_warm_up_unfreezes_at_step_n",
    "tests/test_baseline_command.py",
    "tests/test_lora.py::test_only_the_factors_and_the_spike_path_train_and_merged_equals_unmerged",
    "tests/test_benchmark_script.py",
    "tests/test_vrt_model.py::test_gradients_finite_and_match_finite_differences",
    "tests/test_train_run.py::test_a_tfp_run_and_its_restorer_follow_the_representation",
    "tests/test_vrt_model.py::test_execution_options_do_not_change_the_function",
)


def _shares_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d and d[-1].scope in ("package", "module", "class") for d in defs)


def _rank(nodeid: str) -> int:
    """Position in SLOWEST_FIRST of the longest entry that `nodeid` starts with (the rest: after them)."""
    matches = [(len(prefix), i) for i, prefix in enumerate(SLOWEST_FIRST)
               if nodeid == prefix or nodeid.startswith(prefix + "::") or nodeid.startswith(prefix + "[")]
    return max(matches)[1] if matches else len(SLOWEST_FIRST)


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):      # not an xdist worker: the run is left as it is
        return
    for item in items:
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
    # A grouped module keeps its tests together and in order: its rank is its module's (SLOWEST_FIRST lists such
    # modules whole).
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (_rank(item.nodeid.split("::")[0] if item.get_closest_marker("xdist_group")
                                       else item.nodeid), order[id(item)]))


def pytest_collection_finish(session):
    """Says so when pytest-xdist ignored the groups above: `--dist loadgroup` puts a group's tests on one worker only
    if their node ids carry its `@group` suffix, which pytest-xdist 3.8 cannot add under pytest 9.2
    (pytest-dev/pytest-xdist#1386; setup.py's test extra keeps pytest below 9.2). The tests still pass, but every
    module fixture is then made on both workers: the suite does its longest work twice."""
    if not hasattr(session.config, "workerinput"):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rpartition("::")[2]]
    if lost:
        warnings.warn(f"pytest-xdist ignored the test groups of {len(lost)} tests, e.g. {lost[0]} (pytest "
                      f"{pytest.__version__}): their module fixtures are made on both workers; install the test extra "
                      "(pip install -e '.[test]'), see pytest-dev/pytest-xdist#1386")
