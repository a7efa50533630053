"""scripts/time_breakdown.py: the self time of each traced HLO instruction, attributed to the model's named
scopes, the forward or backward pass and the kind of kernel."""
import subprocess
import sys
import textwrap

import pytest

import helpers as testing

sys.path.insert(0, str(testing.REPO_ROOT / "scripts"))
import time_breakdown  # noqa: E402

# A program whose time is known to sit in one scope: under "stage1" a 1024x1024x1024 matmul (2 GFLOP each way),
# under "stage2" a 64x16x64 one; the gradient adds a backward pass. One call is traced.
PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp

    def f(w, x):
        with jax.named_scope("stage1"):
            big = jnp.tanh(x @ w)
        with jax.named_scope("stage2"):
            small = jnp.cos(x[:64, :16] @ w[:16, :64])
        return jnp.sum(big) * jnp.sum(small)

    w = jnp.ones((1024, 1024), jnp.float32) / 1024
    x = jnp.ones((1024, 1024), jnp.float32)
    g = jax.jit(jax.grad(f))
    jax.block_until_ready(g(w, x))
    with jax.profiler.trace(sys.argv[1], create_perfetto_trace=True):
        jax.block_until_ready(g(w, x))
""")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    dump, trace = tmp_path_factory.mktemp("xla_dump"), tmp_path_factory.mktemp("trace")
    env = testing.subprocess_env()
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_module_re=jit_f "
                        f"{time_breakdown.TRACE_FLAG}")
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(trace)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return trace, dump


def test_the_time_is_attributed_to_the_scope_and_kernel_that_spend_it(traced):
    trace, dump = traced
    result = time_breakdown.breakdown(trace, dump, top=20, module="jit_f")
    assert result["traced_seconds"] > 0 and result["not_in_hlo"] == 0
    parts = {row["part"]: row["seconds"] for row in result["by_part"]}
    assert max(parts, key=parts.get) == "stage1", parts
    assert parts["stage1"] > 4 * parts.get("stage2", 0.0), parts
    passes = {row["pass"]: row["seconds"] for row in result["by_pass"]}
    assert passes["forward"] > 0 and passes["backward"] > 0, passes
    kernels = {row["kernel"]: row["seconds"] for row in result["by_kernel"]}
    assert max(kernels, key=kernels.get) == "dot", kernels
    slowest = result["slowest"][0]
    assert slowest["part"] == "stage1" and slowest["kernel"] == "dot", slowest
    assert abs(sum(row["share"] for row in result["by_pass"]) - 1.0) < 1e-6


def test_self_time_excludes_nested_events_of_the_same_thread_only():
    events = [("t1", 0.0, 10.0, "loop"), ("t1", 2.0, 3.0, "body"), ("t1", 6.0, 1.0, "body"),
              ("t2", 1.0, 4.0, "other")]
    assert time_breakdown.self_times(events) == {"loop": 6.0, "body": 4.0, "other": 4.0}


def test_a_trace_without_instruction_events_is_a_one_line_error(tmp_path):
    import gzip
    import json

    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", "name": "PjitFunction(f)", "ts": 0, "dur": 5}]}, f)
    with pytest.raises(time_breakdown.BreakdownError, match="xla_cpu_enable_xprof_traceme"):
        time_breakdown.read_trace(tmp_path, "jit_f")
    with pytest.raises(time_breakdown.BreakdownError, match="no perfetto_trace.json.gz"):
        time_breakdown.read_trace(tmp_path / "plugins" / "none", "jit_f")


@pytest.mark.parametrize("flag", ["--mode", "--profile_dir=x"])
def test_flags_the_script_sets_itself_are_one_line_errors(flag):
    result = subprocess.run([sys.executable, str(testing.REPO_ROOT / "scripts" / "time_breakdown.py"), flag, "1"],
                            capture_output=True, text=True, timeout=120, env=testing.subprocess_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: time_breakdown.py:")]
    assert len(errors) == 1 and flag.split("=")[0] in errors[0]
