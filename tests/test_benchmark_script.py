"""scripts/benchmark.py runs and reports what docs/PERFORMANCE.md quotes (tiny model, one timed call), and its
compile-only mode reports XLA's plan without running."""
import importlib.util
import json

import jax

import pytest

from vrtspike_jax.train import testing


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("benchmark", testing.REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    precision = jax.config.jax_default_matmul_precision   # main() sets it for its process
    yield module
    jax.config.update("jax_default_matmul_precision", precision)


def test_benchmark_reports_time_flops_and_memory(bench_script, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_script.main(["--model", "tiny_spike", "--frames", "2", "--spike_bins", "4", "--mode", "forward",
                           "--runs", "1", "--warmup", "0", "--remat", "none", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["input"] == [1, 2, 64, 64, 3] and report["spike_input"] == [1, 2, 64, 64, 4]
    assert report["parameters"]["spike_encoder"] > 0 and report["parameters"]["vrt"] > 0
    (forward,) = report["results"]
    assert forward["phase"] == "forward" and len(forward["times_s"]) == 1 and forward["median_s"] > 0
    assert forward["flops"] > 1e8 and forward["xla_memory_bytes"]["temp"] > 0
    assert forward["peak_rss_run_bytes"] > 0 and forward["peak_rss_compile_bytes"] > 0
    assert "forward |" in capsys.readouterr().out


def test_compile_only_mode(bench_script, tmp_path):
    out = tmp_path / "compile.json"
    assert bench_script.main(["--model", "tiny_spike", "--frames", "2", "--spike_bins", "4", "--mode", "forward",
                           "--runs", "0", "--warmup", "0", "--remat", "none", "--json", str(out)]) == 0
    (forward,) = json.loads(out.read_text())["results"]
    assert forward["times_s"] == [] and forward["median_s"] is None and forward["peak_rss_run_bytes"] is None
    assert forward["compile_s"] > 0 and forward["flops"] > 1e8


@pytest.mark.parametrize("flags,fragment", [
    (["--height", "60"], "--height 60 --width 64: VRT needs frame height and width that are multiples of 8"),
    (["--frames", "1"], "VRT needs at least 2 frames"),
    (["--mode", "fwd"], "--mode 'fwd': expected a comma list of forward, train"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--runs", "0"], "--runs 0 compiles only: give --warmup 0 as well"),
    (["--model", "nope"], "invalid choice: 'nope'"),
])
def test_bad_flags_are_one_line_errors_before_anything_is_built(bench_script, capsys, monkeypatch, flags, fragment):
    monkeypatch.setattr(bench_script, "build", lambda args: pytest.fail("built a model for bad flags"))
    with pytest.raises(SystemExit) as exit_info:
        bench_script.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: benchmark.py: ") and fragment in err[0], err
