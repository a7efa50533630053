"""The README's quickstart command, in a short form: the `quick` variant as documented (its model, the embedded
dataset built on first use, validation on full frames) for 2 steps instead of its full length."""
import json

import helpers as testing


def test_quickstart_command_runs_and_reports(tmp_path):
    workdir = tmp_path / "runs" / "quick"
    result = testing.run_main(workdir, "quick", {
        "total_steps": 2, "eval.every_steps": 2, "eval.max_clips": 1, "checkpoint.every_steps": 2,
        "data.embedded_dir": tmp_path / "embedded",          # instead of ~/.cache/vrtspike_jax
        "compilation_cache_dir": tmp_path / "xla_cache"})
    out = result.stdout
    assert f"trained to step 2 in {workdir}" in out
    for line in ("checkpoints:", "TensorBoard:", "triptychs:", "validation PSNR:", "dB blurry input"):
        assert line in out, (line, out)
    assert (workdir / "checkpoints" / "last" / "2" / "params").is_dir()
    assert list((workdir / "triptychs").glob("step_0000002_*.png"))
    report = json.loads((workdir / "metrics" / "val_step_0000002.json").read_text())
    assert report["num_frames"] == 2 and report["input_psnr"] > 15  # one validation clip of the embedded dataset
    assert list((tmp_path / "embedded").glob("embedded-*/READY"))     # built on first use
