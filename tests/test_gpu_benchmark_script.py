"""scripts/gpu_benchmark.sh (the prepared GPU measurement, docs/PERFORMANCE.md section "GPU") without a GPU: its
syntax, the commands its dry run prints (every benchmark.py flag exactly one that scripts/benchmark.py's parser
defines, with values it accepts), the PyTorch comparison's skip lines and commands, and that a failed measurement
does not stop the next one but makes the exit status 1. Nothing here compiles a model: benchmark.py is imported for
its parser and its flag checks only, and the real-mode test runs a stub in place of Python."""
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

import helpers as testing

SCRIPT = testing.REPO_ROOT / "scripts" / "gpu_benchmark.sh"
SHAPES = [("6", "192", "192"), ("5", "256", "256")]
# (config, frames, height, width, JSON name) of each JAX measurement, in the script's order
JAX_STEPS = [("configs/baseline.py:vrt_only", "6", "192", "192", "jax_vrt_only_train_6x192x192.json"),
             ("configs/baseline.py", "6", "192", "192", "jax_train_6x192x192.json"),
             ("configs/baseline.py", "5", "256", "256", "jax_train_5x256x256.json")]


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("benchmark_for_gpu_script", testing.REPO_ROOT / "scripts" /
                                                  "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, env=None, timeout=60):
    """The script's (exit status, stdout + stderr), with `env` over a copy of this environment (no DRY_RUN, OUT,
    VRT_TORCH_HARNESS, PYTHON of the caller's) and this interpreter as its Python."""
    base = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "OUT", "VRT_TORCH_HARNESS", "PYTHON")}
    base["PYTHON"] = sys.executable
    base.update(env or {})
    done = subprocess.run(["bash", str(SCRIPT), *args], env=base, capture_output=True, text=True, timeout=timeout,
                          cwd=testing.REPO_ROOT)
    return done.returncode, done.stdout + done.stderr


def benchmark_commands(output):
    """The benchmark.py argument lists of the dry run's `dry run: timeout ... scripts/benchmark.py ...` lines."""
    commands = []
    for line in output.splitlines():
        if line.startswith("dry run: ") and "scripts/benchmark.py" in line:
            tokens = shlex.split(line[len("dry run: "):])
            commands.append(tokens[tokens.index("scripts/benchmark.py") + 1:])
    return commands


def flag_problems(parser, bench_module, argv):
    """What is wrong with `argv` for benchmark.py: a `--flag` that is not exactly one of the parser's option strings
    (argparse would accept an abbreviation such as --frame), or what the parser and its check_args refuse."""
    options = {option for action in parser._actions for option in action.option_strings}
    problems = [token for token in argv if token.startswith("--") and token.split("=")[0] not in options]
    try:
        bench_module.check_args(parser, parser.parse_args(argv))
    except SystemExit as exit_:   # cli.ArgumentParser: one line on stderr, exit status 2
        problems.append(f"refused (exit status {exit_.code})")
    return problems


def test_the_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_benchmark_commands_that_benchmark_py_accepts(bench_module, tmp_path, how):
    out_dir = tmp_path / "bench out"
    args, env = ((["--dry_run", str(out_dir)], {}) if how == "flag" else ([], {"DRY_RUN": "1", "OUT": str(out_dir)}))
    code, output = run_script(*args, env=env)
    assert code == 0, output
    assert not out_dir.exists(), "a dry run creates nothing"
    assert "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv" in output
    assert "PyTorch comparison skipped: VRT_TORCH_HARNESS is not set" in output
    commands = benchmark_commands(output)
    assert len(commands) == len(JAX_STEPS), output
    parser = bench_module.build_parser()
    for argv, (config, frames, height, width, json_name) in zip(commands, JAX_STEPS):
        assert flag_problems(parser, bench_module, argv) == [], argv
        args = parser.parse_args(argv)
        assert (args.config, args.dtype, args.mode, args.batch) == (config, "bfloat16", "train", 1)
        assert (str(args.frames), str(args.height), str(args.width)) == (frames, height, width)
        assert args.runs >= 1 and args.warmup >= 1
        assert args.json == str(out_dir / json_name)


def test_a_misspelt_or_refused_flag_is_caught(bench_module):
    """The check above can fail: an abbreviation argparse would take, an unknown flag, a refused value."""
    parser = bench_module.build_parser()
    good = ["--config", "configs/baseline.py", "--frames", "6", "--height", "192", "--width", "192", "--dtype",
            "bfloat16", "--mode", "train"]
    assert flag_problems(parser, bench_module, good) == []
    assert flag_problems(parser, bench_module, ["--frame", "6"]) == ["--frame"]
    assert "--dtpye" in flag_problems(parser, bench_module, ["--dtpye", "bfloat16"])
    assert flag_problems(parser, bench_module, ["--dtype", "bf16"]) == ["refused (exit status 2)"]
    assert flag_problems(parser, bench_module, ["--height", "190"]) == ["refused (exit status 2)"]


def test_pytorch_comparison_skips_fails_or_prints_the_harness_commands(tmp_path):
    harness = tmp_path / "vrt_torch_harness.py"
    harness.write_text("")
    code, output = run_script("--dry_run", str(tmp_path), env={"VRT_TORCH_HARNESS": str(tmp_path / "absent.py")})
    assert code == 1 and f"FAILED torch: VRT_TORCH_HARNESS={tmp_path / 'absent.py'} is not a file" in output
    # Without torch (a folder whose torch module raises ImportError first on the path): one skip line.
    no_torch = tmp_path / "no_torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    code, output = run_script("--dry_run", str(tmp_path), env={"VRT_TORCH_HARNESS": str(harness),
                                                              "PYTHONPATH": str(no_torch)})
    assert code == 0, output
    assert f"PyTorch comparison skipped: {sys.executable} cannot import torch (ImportError: torch hidden by the test)" \
        in output
    # With an importable torch (a stand-in module): the harness runs for both shapes, the 6x192x192 one first of all
    # (seconds of GPU time) and the 5x256x256 one last, after the JAX measurements.
    fake = tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "__version__ = 'stand-in'\nclass version:\n    cuda = None\n"
        "class cuda:\n    @staticmethod\n    def is_available():\n        return False\n")
    code, output = run_script("--dry_run", str(tmp_path), env={"VRT_TORCH_HARNESS": str(harness),
                                                              "PYTHONPATH": str(fake)})
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.startswith("dry run: timeout")]
    assert len(lines) == 2 + len(JAX_STEPS), output
    torch_lines = [lines[0], lines[-1]]
    assert all("scripts/benchmark.py" in line for line in lines[1:-1]), output
    for line, (frames, height, width) in zip(torch_lines, SHAPES):
        tokens = shlex.split(line[len("dry run: "):])
        assert tokens[tokens.index(str(harness)) + 1:] == [
            "--frames", frames, "--height", height, "--width", width,
            "--json", str(tmp_path / f"torch_train_{frames}x{height}x{width}.json")]


def test_a_failed_measurement_does_not_stop_the_next_and_the_exit_status_says_so(tmp_path):
    """A stand-in for Python that fails the baseline's 6x192x192 benchmark and passes everything else (no model is
    built)."""
    stub = tmp_path / "python_stub"
    stub.write_text('#!/usr/bin/env bash\n'
                    'case " $* " in *" scripts/benchmark.py --config configs/baseline.py --batch 1 --frames 6 "*) '
                    'exit 5;; esac\nexit 0\n')
    stub.chmod(0o755)
    out_dir = tmp_path / "out"
    code, output = run_script(str(out_dir), env={"PYTHON": str(stub)})
    assert code == 1, output
    assert "FAILED jax_train_6x192x192: exit status 5" in output
    assert "done jax_train_5x256x256" in output and "done jax_vrt_only_train_6x192x192" in output
    assert "FAILED 1 step(s): jax_train_6x192x192 (exit status 5)" in output
    assert "PyTorch comparison skipped: VRT_TORCH_HARNESS is not set" in output
    assert (out_dir / "gpu_benchmark.log").exists()


@pytest.mark.parametrize("args,env,message", [
    (["--dry-run"], {}, "error: gpu_benchmark.sh: unknown option --dry-run"),
    (["a", "b"], {}, "error: gpu_benchmark.sh: one OUTPUT_DIR expected, got a and b"),
    ([], {"DRY_RUN": "yes"}, "error: gpu_benchmark.sh: DRY_RUN=yes: expected 0 or 1"),
])
def test_bad_command_lines_stop_with_one_line(args, env, message):
    code, output = run_script(*args, env=env)
    assert code == 2 and output.strip().splitlines() == [output.strip()] and message in output, output
