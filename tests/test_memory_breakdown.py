"""scripts/memory_breakdown.py: XLA's buffers live at the peak, attributed to the model's named scopes."""
import subprocess
import sys
import textwrap

import pytest

import helpers as testing

sys.path.insert(0, str(testing.REPO_ROOT / "scripts"))
import memory_breakdown  # noqa: E402

# A program whose peak is known: under the scope "stage1" a matmul makes a 16 MiB array (a dot's output is always
# materialised), under "stage2" a 64 KiB one; the gradient adds a backward pass.
PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp

    def f(w, x):
        with jax.named_scope("stage1"):
            big = jnp.tanh(x @ w)                                          # [2048, 2048] float32: 16 MiB
        with jax.named_scope("stage2"):
            small = jnp.cos(x[:128] @ w[:, :128])                          # 64 KiB
        return jnp.sum(big) * jnp.sum(small)

    w = jnp.ones((1024, 2048), jnp.float32) / 1024
    x = jnp.ones((2048, 1024), jnp.float32)
    compiled = jax.jit(jax.grad(f)).lower(w, x).compile()
    print(compiled.memory_analysis().temp_size_in_bytes)
""")


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xla_dump")
    env = testing.subprocess_env()
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={folder} --xla_dump_hlo_module_re=jit_f"
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, int(result.stdout.split()[-1])


def test_the_peak_is_attributed_to_the_scope_that_holds_it(dumped):
    folder, temp_bytes = dumped
    result = memory_breakdown.breakdown(folder, top=10, module="jit_f")
    parts = {row["part"]: row["bytes"] for row in result["by_part"]}
    assert max(parts, key=parts.get) == "stage1", parts
    assert parts["stage1"] >= 16 * 2 ** 20
    # XLA's heap simulation counts at least the temporaries its memory analysis plans.
    assert result["peak_bytes"] >= result["live_bytes"] > 0
    assert result["peak_bytes"] >= temp_bytes * 0.9
    kernels = {row["part"]: row["kernels"] for row in result["kernels_by_part"]}
    assert kernels["stage1"] >= 1 and kernels["stage2"] >= 1
    assert kernels["(all)"] >= kernels["stage1"] + kernels["stage2"]
    largest = result["largest"][0]
    assert largest["part"] == "stage1" and largest["bytes"] >= 16 * 2 ** 20 and "2048,2048" in largest["shape"]


def test_op_names_classify_into_part_sub_part_pass_and_op():
    assert memory_breakdown.classify("fusion", "jit(train_step)/transpose(jvp(stage3))/parallel_warp/gather") == {
        "part": "stage3", "sub_part": "parallel_warp", "pass": "backward", "op": "gather"}
    assert memory_breakdown.classify("fusion", "jit(train_step)/jvp()/stage8_2/attention/dot_general") == {
        "part": "stage8_2", "sub_part": "attention", "pass": "forward", "op": "dot_general"}
    assert memory_breakdown.classify("parameter", "")["part"] == "(arguments)"
    assert memory_breakdown.classify("add", "jit(train_step)/add")["part"] == "(unscoped)"
    assert memory_breakdown.classify("fusion", "jit(train_step)/optimizer/jit(_where)/select_n")["part"] == "optimizer"


def test_the_peak_section_is_read_with_its_position_and_total():
    text = textwrap.dedent("""\
        HloLiveRange (max 9):
          InstructionSequence:
            0:p0
            1:fusion.3
          BufferLiveRange:
            fusion.3{}:1-2
          Live ranges at 1 (peak):
            fusion.3{}: 4096 bytes (cumulative: 4096 bytes)
            p0{}: 1024 bytes (cumulative: 5120 bytes)
          Stack trace breakdown for peak usage: 5 120 bytes
        """).splitlines()
    assert memory_breakdown.read_peak(text) == (1, [("fusion.3", 4096), ("p0", 1024)], 5120)
    assert memory_breakdown.schedule_at(text, 1) == "fusion.3"


@pytest.mark.parametrize("flag", ["--runs=3", "--mode", "--warmup"])
def test_flags_the_script_sets_itself_are_one_line_errors(flag):
    result = subprocess.run([sys.executable, str(testing.REPO_ROOT / "scripts" / "memory_breakdown.py"), flag, "1"],
                            capture_output=True, text=True, timeout=120, env=testing.subprocess_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: memory_breakdown.py:")]
    assert len(errors) == 1 and flag.split("=")[0] in errors[0]
