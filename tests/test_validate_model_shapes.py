"""scripts/validate_model_shapes.py on the real configs/baseline.py (every variant) and its command-line errors."""
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = "scripts/validate_model_shapes.py"


def run_script(*args):
    """The script as a user runs it: `python scripts/validate_model_shapes.py ...` from the repository root."""
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_baseline_config_validates_as_a_user_runs_it():
    run = run_script("--config=configs/baseline.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "ERROR" not in run.stdout + run.stderr
    out = run.stdout
    assert "input frames (1, 5, 256, 256, 3), spike voxels (1, 5, 256, 256, 32) -> output (1, 5, 256, 256, 3)" in out
    assert "fused stages [1, 2, 3, 4, 5, 6, 7]" in out
    assert "compute dtype float32 (backend cpu)" in out   # dtype 'auto' on CPU, as training resolves it
    # 18,320,007: the official deblurring VRT (the sum of the parameter shapes in state_dict_keys_deblur.tsv).
    assert "vrt 18,320,007," in out
    assert "MISALIGNED" not in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6, 7]


# Every variant of configs/baseline.py (and the combinations a user would try), validated in one process with the
# script's own functions: the config as `--config=configs/baseline.py:<variant>` loads it, the default sizes of
# main(), and the model as training builds it.
_DRIVER = r"""
import importlib.util, json, sys, types
spec = importlib.util.spec_from_file_location("validate_model_shapes", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
from configs import baseline
from vrtspike_jax import factory
results = {}
for variant in sys.argv[2:]:
    backend = None
    if variant.startswith("gpu="):                   # training on a GPU: dtype 'auto' -> bfloat16 compute
        backend, variant = "gpu", variant[len("gpu="):]
        real = factory.jax                           # where the model section's dtype 'auto' is resolved
        factory.jax = types.SimpleNamespace(default_backend=lambda: "gpu", device_count=lambda: 1)   # one GPU
    config = script.run_config.read(baseline.get_config(variant))
    frames, size, _ = script.clip_shape(config)
    lines = []
    status = script.validate(config, frames, size, size, out=lines.append)
    if backend:
        factory.jax = real
    results[(backend + "=" if backend else "") + variant] = dict(
        status=status, lines=lines, frames=frames, size=size, fuse_stages=list(config.model.fuse_stages),
        use_spike=bool(config.model.use_spike), bins=int(config.data.num_bins), scale=int(config.data.spike_scale))
print("RESULTS" + json.dumps(results))
"""

VARIANTS = ["", "quick", "tiny", "vrt_only", "vrt120", "fuse14", "quick,vrt_only", "tiny,fuse14", "quick,vrt120",
            "quick,bench", "gpu=", "quick,kair_warmup", "quick,frozen_backbone", "quick,staged", "quick,ema",
            "quick,lora", "quick,lean"]


@pytest.fixture(scope="module")
def variant_reports():
    from configs import baseline
    assert set(baseline.VARIANTS) <= set(v for name in VARIANTS for v in name.split(",")), \
        "a variant of configs/baseline.py is not covered here"
    run = subprocess.run([sys.executable, "-c", _DRIVER, SCRIPT, *VARIANTS], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULTS")]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_baseline_variant_builds_and_lines_up(variant_reports, variant):
    report = variant_reports[variant]
    lines = report["lines"]
    assert report["status"] == 0, lines
    assert not any("ERROR" in x or "MISALIGNED" in x for x in lines), lines
    t, s, k, f = report["frames"], report["size"], report["bins"], report["scale"]
    assert lines[0] == (f"input frames (1, {t}, {s}, {s}, 3), spike voxels (1, {t}, {s // f}, {s // f}, {k}) -> "
                        f"output (1, {t}, {s}, {s}, 3)")
    fused = report["fuse_stages"] if report["use_spike"] else []
    dtype = "bfloat16" if variant.startswith("gpu=") else "float32"
    assert lines[1].startswith(f"use_spike={report['use_spike']}, fused stages {fused}, spike_scale={f}, "
                               f"compute dtype {dtype}")
    rows = [x.split() for x in lines if x.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == fused
    assert lines[-1].startswith("parameters: vrt ")
    if not report["use_spike"]:
        assert "spike_encoder 0," in lines[-1]


def assert_one_line_error(run, *needles):
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), run.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_unknown_variant_is_one_line_naming_it():
    run = run_script("--config=configs/baseline.py:quick,nope")
    assert_one_line_error(run, "--config=configs/baseline.py:quick,nope", "unknown variant 'nope'",
                          "known: ['bench', 'ema', 'frozen_backbone', 'fuse14', 'kair_warmup', 'lean', 'lora', 'quick', "
                          "'staged', 'tiny', 'vrt120', 'vrt_only']")


def test_missing_config_file_is_one_line_naming_it():
    run = run_script("--config=configs/no_such_config.py:tiny")
    assert_one_line_error(run, "no such config file 'configs/no_such_config.py'", "--config=configs/baseline.py")


def test_unloadable_config_file_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "broken_config.py"
    broken.write_text("def get_config(:\n    pass\n")
    run = run_script(f"--config={broken}")
    assert_one_line_error(run, f"--config={broken}", "invalid syntax")


def test_unknown_config_field_override_is_one_line_naming_it():
    run = run_script("--config=configs/baseline.py:tiny", "--config.model.no_such_field=1")
    assert_one_line_error(run, "--config.model.no_such_field=1", "no field 'no_such_field'")
