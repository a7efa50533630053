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
# under "stage2" a 64x16x64 one, under "stage3" a 3x3 convolution (32 to 32 channels over 96x96 pixels, 0.17 GFLOP
# each way, which XLA:CPU runs asynchronously on the tests' flags); the gradient adds a backward pass. One call is
# traced.
PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp

    def f(w, x, k, image):
        with jax.named_scope("stage1"):
            big = jnp.tanh(x @ w)
        with jax.named_scope("stage2"):
            small = jnp.cos(x[:64, :16] @ w[:16, :64])
        with jax.named_scope("stage3"):
            conv = jnp.sin(jax.lax.conv_general_dilated(image, k, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(big) * jnp.sum(small) + jnp.sum(conv)

    w = jnp.ones((1024, 1024), jnp.float32) / 1024
    x = jnp.ones((1024, 1024), jnp.float32)
    k = jnp.ones((3, 3, 32, 32), jnp.float32) / 288
    image = jnp.ones((1, 96, 96, 32), jnp.float32)
    g = jax.jit(jax.grad(f, argnums=(0, 2)))
    jax.block_until_ready(g(w, x, k, image))
    with jax.profiler.trace(sys.argv[1], create_perfetto_trace=True):
        jax.block_until_ready(g(w, x, k, image))
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


def test_the_attributed_time_covers_the_traced_call_convolutions_included(traced):
    """XLA:CPU's convolution events end at the launch; the work after it is the convolution's, not lost."""
    trace, dump = traced
    result = time_breakdown.breakdown(trace, dump, top=50, module="jit_f")
    events = time_breakdown.read_trace(trace, "jit_f")
    span = (max(start + duration for _, start, duration, _ in events) - min(start for _, start, _, _ in events)) / 1e6
    covered = result["attributed_seconds"] + result["between_seconds"] + result["unattributed_seconds"]
    assert covered >= 0.95 * span, (covered, span, result)
    assert result["unattributed_seconds"] <= 0.05 * span, result
    convolutions = [row for row in result["slowest"] if row["kernel"] == "convolution"]
    assert convolutions and all(row["part"] == "stage3" for row in convolutions), convolutions
    assert result["async_seconds"] > 0 and sum(row["async_seconds"] for row in convolutions) > 0, convolutions
    assert abs(result["attributed_seconds"] - result["traced_seconds"] - result["async_seconds"]) < 1e-9


def test_an_idle_stretch_goes_to_the_asynchronous_instruction_waited_for():
    instruction = time_breakdown.Instruction
    instructions = {"conv_a": instruction("convolution", "f32[8]", "", None, (), None),
                    "conv_b": instruction("convolution", "f32[8]", "", None, (), None),
                    "add": instruction("fusion", "f32[8]", "", None, ("conv_a",), None),
                    "mul": instruction("fusion", "f32[8]", "", None, ("add",), None),
                    "neg": instruction("fusion", "f32[8]", "", None, (), None)}
    events = [("t1", 0.0, 1.0, "neg"), ("t1", 301.0, 1.0, "mul"),    # 300 us idle, no convolution before it
              ("t1", 302.0, 2.0, "conv_a"), ("t2", 304.0, 1.0, "conv_b"),
              ("t1", 905.0, 1.0, "add"),                             # waited 600 us for its operand conv_a
              ("t1", 916.0, 1.0, "mul"),                             # 10 us: the executor's own time
              ("t2", 1017.0, 1.0, "neg")]                            # 100 us: conv_b, the last launched
    tails, between, unattributed = time_breakdown.async_tails(events, instructions, min_gap_us=50.0)
    assert tails == {"conv_a": 600.0, "conv_b": 100.0}
    assert between == 10.0 and unattributed == 300.0


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
