"""The tests' own helpers (not part of the package): subprocess runs of main.py with the `tiny` variant, and tiny
versions of the embedded dataset.

Test runs go through subprocesses so each can have its own XLA flags (fake CPU devices). Every test process, the
pytest process(es) included (tests/conftest.py), runs XLA with TEST_XLA_FLAGS and shares one persistent compilation
cache for the session (JAX_COMPILATION_CACHE_DIR, set by tests/conftest.py and inherited by the subprocesses): the
same program (same config, shapes and flags) is compiled once per test session.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from data_pipelines import prepare, synthetic
from vrtspike_jax import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
MAIN = REPO_ROOT / "main.py"
# XLA:CPU settings of every test process, pytest's own included (tests/conftest.py): backend optimisation level 0.
# For short test runs the compile time dominates: the tiny train step compiles in 85 s instead of 205 s (measured on
# a loaded 2-core machine), runs as fast (2.5 s a step) and computes the same numbers (the finite-difference gradient
# test of test_vrt_model.py gives the same errors, digit for digit). The same flags everywhere also let a program
# compiled in one process be a persistent-cache hit in any other.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def with_xla_flags(flags: str) -> str:
    """An XLA_FLAGS string with the TEST_XLA_FLAGS it lacks added (nothing of it removed)."""
    present = flags.split()
    return " ".join(present + [f for f in TEST_XLA_FLAGS if f not in present])


def subprocess_env(*, device_count: Optional[int] = None, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a test subprocess: CPU only, quiet TF, TEST_XLA_FLAGS (+ fake devices), the session's
    compilation cache (JAX_COMPILATION_CACHE_DIR, inherited)."""
    env = dict(os.environ)
    flags = [f for f in with_xla_flags(env.get("XLA_FLAGS", "")).split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if device_count:
        if int(device_count) > 1:  # the parent's memory scheduler flag deadlocks multi-device steps (runtime.py)
            flags = [f for f in flags if f != runtime.CPU_SCHEDULER_FLAG]
        flags.append(f"--xla_force_host_platform_device_count={int(device_count)}")
        # Fake devices share the CPU cores: on a loaded 2-core machine one device can reach a collective minutes
        # after the others, past XLA's default 40 s termination timeout.
        flags.append("--xla_cpu_collective_call_terminate_timeout_seconds=1200")
    env.update({"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
                "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT), str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])})
    env.pop("VRTSPIKE_DISTRIBUTED", None)
    if extra:
        env.update(extra)
    return env


def overrides_to_flags(overrides: Mapping[str, object]) -> List[str]:
    """{'total_steps': 4, 'data.root': None} -> ['--config.total_steps=4', '--config.data.root=None']."""
    flags = []
    for key, value in overrides.items():
        if isinstance(value, (tuple, list)):
            value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        flags.append(f"--config.{key}={value}")
    return flags


def main_command(workdir, variant: str = "tiny", overrides: Optional[Mapping[str, object]] = None) -> List[str]:
    """`python main.py --config=configs/baseline.py:<variant> --workdir=W --config.k=v ...`."""
    return [sys.executable, str(MAIN), f"--config={REPO_ROOT / 'configs' / 'baseline.py'}:{variant}",
            f"--workdir={workdir}"] + overrides_to_flags(overrides or {})


def run_main(workdir, variant: str = "tiny", overrides: Optional[Mapping[str, object]] = None, *,
             device_count: Optional[int] = None, timeout: float = 900,
             extra_env: Optional[Mapping[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs main.py to completion; with `check`, a non-zero exit raises AssertionError with the output's tail."""
    result = subprocess.run(main_command(workdir, variant, overrides), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout, env=subprocess_env(device_count=device_count,
                                                                           extra=extra_env))
    if check and result.returncode != 0:
        raise AssertionError(f"main.py exited with {result.returncode}:\n{tail(result)}")
    return result


def tail(result: subprocess.CompletedProcess, lines: int = 60) -> str:
    text = (result.stdout or "") + (result.stderr or "")
    return "\n".join(text.splitlines()[-lines:])


def read_jsonl(path) -> List[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(path) -> Dict[int, List[float]]:
    """step -> every loss logged for it in a train_metrics.jsonl (several when a resume repeated the step)."""
    out: Dict[int, List[float]] = {}
    for record in read_jsonl(path):
        out.setdefault(int(record["step"]), []).append(record["loss"])
    return out


# The learning-rate schedule's length of every tiny test run, whatever its total_steps: the train step is then one
# program for all of them (and for tiny_run_config), compiled once per session.
TINY_SCHEDULE_STEPS = 16


def tiny_overrides(embedded_dir, cache_dir, **more) -> Dict[str, object]:
    """Overrides every tiny test run shares (the train-step program depends only on these and the variant)."""
    overrides: Dict[str, object] = {"data.embedded_dir": embedded_dir, "compilation_cache_dir": cache_dir,
                                    "optimizer.schedule_steps": TINY_SCHEDULE_STEPS}
    overrides.update(more)
    return overrides


def tiny_run_config():
    """The config of the tiny test runs (`tiny` with tiny_overrides' schedule): in-process, its train step at
    TINY_BATCH_SHAPES is the program those runs compile (a persistent-cache hit once one of them has)."""
    from configs import baseline

    config = baseline.get_config("tiny")
    config.optimizer.schedule_steps = TINY_SCHEDULE_STEPS
    return config


# ------------------------------------------------------------------------------------------- tiny datasets

# 32x32 frames, 32 spike frames per exposure (one per bin at K = 32); renders in well under a second.
TINY_SPEC = synthetic.SyntheticSpec(height=32, width=32, train_sequences=3, val_sequences=1, train_frames=7,
                                    val_frames=6, subframes=32, blur_px=5.0, threshold=1.0, seed=0)


def make_tiny_root(path, prepare_it: bool = True, num_bins: int = 32, **overrides) -> Path:
    """Renders TINY_SPEC (with `overrides`) into `path`; prepares it unless `prepare_it` is False."""
    spec = dataclasses.replace(TINY_SPEC, **overrides)
    root = synthetic.make_dataset(Path(path), spec)
    if prepare_it:
        result = prepare.prepare_root(prepare.PrepareOptions(root=root, num_bins=num_bins, progress=False),
                                      log=lambda line: None)
        if result.exit_code != 0:
            raise RuntimeError("; ".join(p.message for p in result.problems))
    return root


# ------------------------------------------------------------------------------------------- tiny train steps

TINY_BATCH_SHAPES = {"blur": (2, 2, 64, 64, 3), "sharp": (2, 2, 64, 64, 3), "spike_vox": (2, 2, 64, 64, 4)}


def tiny_batch(seed: int = 0) -> Dict[str, object]:
    """A random batch of TINY_BATCH_SHAPES (frames in [0, 1), normal spike inputs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=shape) if k == "spike_vox" else rng.uniform(size=shape)).astype(np.float32)
            for k, shape in TINY_BATCH_SHAPES.items()}


def compiled_tiny_step(config):
    """(setup, mesh, params, train_state, compiled step) of `config` on one device, at step 0."""
    import jax

    from vrtspike_jax import factory
    from vrtspike_jax.train import sharding, train_lib

    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    setup = train_lib.build_train_setup(config, mesh)
    params, state = setup.init_state(factory.initial_params(config), config.seed)
    compiled, _, _ = setup.compile_step(params, state, TINY_BATCH_SHAPES)
    return setup, mesh, params, state, compiled


def tiny_train_steps(config, steps: int):
    """`steps` train steps of the compiled step on one batch: (compiled FLOPs, params after each step, state)."""
    import jax

    from vrtspike_jax.train import sharding

    setup, mesh, params, state, step = compiled_tiny_step(config)
    batch = sharding.global_batch(tiny_batch(), mesh, setup.keys)
    history = [jax.device_get(params)]
    for _ in range(steps):
        params, state, _ = step(params, state, batch, setup.vgg_params)
        history.append(jax.device_get(params))
    return step.cost_analysis()["flops"], history, jax.device_get(state)


def group_leaves(params, group: str) -> list:
    """The leaves of `params` in parameter group `group` (vrtspike_jax/train/param_groups.py), in tree order."""
    import jax

    from vrtspike_jax.train import param_groups

    return [leaf for leaf, g in zip(jax.tree.leaves(params), jax.tree.leaves(param_groups.group_tree(params)))
            if g == group]


def same_leaves(a, b) -> bool:
    import numpy as np

    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


__all__ = ["MAIN", "REPO_ROOT", "TEST_XLA_FLAGS", "with_xla_flags", "losses_by_step",
           "main_command", "overrides_to_flags", "read_jsonl", "run_main", "subprocess_env", "tail", "tiny_overrides",
           "TINY_SPEC", "make_tiny_root", "TINY_BATCH_SHAPES", "compiled_tiny_step", "group_leaves", "same_leaves",
           "tiny_batch", "tiny_train_steps", "TINY_SCHEDULE_STEPS", "tiny_run_config"]


def blocks_one_by_one(tree):
    """A parameter tree (nested dicts) in the layout checkpoints had before 2026-11-30: each TMSA group's stacked
    blocks (a 'blocks' folder of arrays with a leading block axis) as one folder per block, '0', '1', ..."""
    import numpy as np

    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "blocks" and isinstance(value, Mapping) and "attn" in value:
            import jax

            depth = jax.tree.leaves(value)[0].shape[0]
            out[key] = {str(i): jax.tree.map(lambda leaf, i=i: np.asarray(leaf)[i], value) for i in range(depth)}
        else:
            out[key] = blocks_one_by_one(value)
    return out
