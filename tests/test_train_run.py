"""End to end: main.py / train_and_evaluate on tiny data in subprocesses (one compiled program shared through a
persistent compilation cache): the workdir's artefacts, exact resume after kill -9, resume with a larger
total_steps, the stop after K non-finite steps in a row, and two processes (jax.distributed on localhost, gloo)
against the one-process run with the same global batch."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import helpers as testing

TOTAL = 6


@pytest.fixture(scope="session")
def shared(tiny_run_paths):
    """Paths shared by the module's runs: the tiny embedded dataset and the compilation cache (session-wide)."""
    return tiny_run_paths


@pytest.fixture(scope="module")
def reference_run(shared, tmp_path_factory):
    """The uninterrupted run: TOTAL steps, validation and checkpoints every 2 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    result = testing.run_main(workdir, "tiny", testing.tiny_overrides(
        shared["embedded"], shared["cache"], total_steps=TOTAL))
    return workdir, result


def test_end_to_end_run_leaves_every_artefact(reference_run):
    workdir, result = reference_run
    # checkpoints: last (every 2 steps, 3 kept) and best, each with its items
    last = sorted(int(p.name) for p in (workdir / "checkpoints" / "last").iterdir() if p.name.isdigit())
    assert last == [2, 4, 6]
    for item in ("params", "train_state", "data", "config"):
        assert (workdir / "checkpoints" / "last" / "6" / item).is_dir()
    data = json.loads((workdir / "checkpoints" / "last" / "6" / "data" / "metadata").read_text())
    assert data["next_step"] == 6 and data["data_seed"] == 123 and data["global_batch_size"] == 2
    best = [p for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1 and (best[0] / "metrics" / "metrics").is_file()
    # TensorBoard event files
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # one metrics JSON per validation, literature metrics and the blurry-input baseline
    reports = sorted((workdir / "metrics").glob("val_step_*.json"))
    assert [p.name for p in reports] == ["val_step_0000002.json", "val_step_0000004.json", "val_step_0000006.json"]
    report = json.loads(reports[-1].read_text())
    for key in ("psnr", "psnr_y", "ssim", "ssim_y", "input_psnr", "input_psnr_y", "input_ssim_y"):
        assert np.isfinite(report[key]), key
    # what the splits leave out is counted in the run's metrics (tiny: 2 x 4 train frames, 4 val frames, T = 2)
    assert report["data"]["train"] == {"excluded_runs": 0, "excluded_frames": 0, "window_breaks": 0,
                                       "prepare_problems": 0, "num_frames": 8, "num_clips": 6}
    assert report["data"]["val"]["num_frames"] == 4 and report["data"]["val"]["excluded_runs"] == 0
    assert report["num_frames"] == 4  # every validation frame once (4 frames, clips of 2)
    # triptychs: blur | restored | sharp, 64x64 frames side by side
    from PIL import Image
    pngs = sorted((workdir / "triptychs").glob("step_0000006_*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (192, 64)
    # run record: code revision, full config, installed packages
    record = json.loads(next((workdir / "run_records").glob("run_000_*.json")).read_text())
    assert record["config"]["total_steps"] == TOTAL and record["config"]["model"]["vrt_preset"] == "small_fixture"
    assert any(line.lower().startswith("jax==") for line in record["packages"])
    assert "revision" in record["git"] or "error" in record["git"]
    # per-step training scalars and the closing summary
    assert sorted(testing.losses_by_step(workdir / "train_metrics.jsonl")) == list(range(1, TOTAL + 1))
    assert "validation PSNR" in result.stdout and str(workdir / "triptychs") in result.stdout


def test_load_model_from_checkpoint_of_a_run(reference_run):
    import orbax.checkpoint as ocp
    from flax import nnx

    from vrtspike_jax.train.checkpointing import load_model_from_checkpoint
    workdir, _ = reference_run
    model, config = load_model_from_checkpoint(workdir, which="last")
    assert config.total_steps == TOTAL and model.config.spike_bins == 4 and model.config.use_spike
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(workdir / "checkpoints" / "last" / str(TOTAL) / "params")
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    best, _ = load_model_from_checkpoint(workdir)  # which="best": the step with the best validation PSNR
    best_step = max(json.loads(p.read_text())["psnr"] for p in (workdir / "metrics").glob("val_step_*.json"))
    kept = next(p for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit())
    assert json.loads((kept / "metrics" / "metrics").read_text())["psnr"] == pytest.approx(best_step)
    assert nnx.graphdef(best) == nnx.graphdef(model)


def test_restorer_defaults_reproduce_the_training_validation(reference_run, shared, tmp_path, capsys):
    """scripts/test.py with its default flags, on the validation sequence, gives the PSNR that training's validation
    measured for the `best` checkpoint: the restorer gives the model its training clip length (T = 2) as temporal
    context, and says so. Longer chunks are a one-line warning."""
    from test_test_script import load_script

    workdir, _ = reference_run
    script = load_script()
    root = next(Path(shared["embedded"]).glob("embedded-*"))
    seq = next((root / "val").iterdir())
    best_step = int(next(p.name for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit()))
    validation = json.loads((workdir / "metrics" / f"val_step_{best_step:07d}.json").read_text())
    inputs = ["--checkpoint", str(workdir), "--input_blur", str(seq / "blur"), "--input_spike_vox",
              str(seq / "spike_vox"), "--gt", str(seq / "sharp"), "--noprogress"]
    assert script.main(inputs + ["--output", str(tmp_path / "default")]) == 0
    report = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert report["tile"]["temporal"] == 2 and report["tile"]["temporal_overlap"] == 0
    assert report["trained_clip_length"] == 2 and report["warnings"] == []
    assert validation["num_frames"] == len(report["metrics"]["per_frame"]) == 4
    for key in ("psnr", "psnr_y", "ssim", "ssim_y", "input_psnr", "input_psnr_y", "input_ssim", "input_ssim_y"):
        assert report["metrics"]["average"][key] == pytest.approx(validation[key], abs=1e-3), key   # one schema
    assert "the clip length T=2 this checkpoint was trained with" in capsys.readouterr().err
    # an explicit --tile (e.g. smaller spatial tiles for memory) keeps the chunks side by side, as validation
    assert script.main(inputs + ["--output", str(tmp_path / "explicit"), "--tile", "2", "128"]) == 0
    explicit = json.loads((tmp_path / "explicit" / "metrics.json").read_text())
    assert explicit["tile"]["temporal_overlap"] == 0
    assert explicit["metrics"]["average"]["psnr"] == pytest.approx(validation["psnr"], abs=1e-3)
    assert script.main(inputs + ["--output", str(tmp_path / "long"), "--tile", "4", "256"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "longer than the 2-frame clips this model was trained with" in warnings[0]


def test_kill_9_then_resume_gives_the_same_losses_step_by_step(reference_run, shared, tmp_path):
    reference_dir, _ = reference_run
    reference = {step: losses[0] for step, losses in testing.losses_by_step(
        reference_dir / "train_metrics.jsonl").items()}
    overrides = testing.tiny_overrides(shared["embedded"], shared["cache"], total_steps=TOTAL,
                                       **{"eval.max_clips": 0})
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(testing.main_command(workdir, "tiny", overrides), cwd=testing.REPO_ROOT,
                            env=testing.subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(testing.read_jsonl(workdir / "train_metrics.jsonl")) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no training progress within 10 minutes"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_steps = sorted(testing.losses_by_step(workdir / "train_metrics.jsonl"))
    assert killed_steps[-1] < TOTAL, "the run finished before the kill"
    testing.run_main(workdir, "tiny", overrides)
    records = sorted((workdir / "run_records").glob("run_*.json"))
    resumed = json.loads(records[-1].read_text())
    assert resumed["start_step"] > 0 and resumed["resumed_from"].endswith(f"last/{resumed['start_step']}")
    logged = testing.losses_by_step(workdir / "train_metrics.jsonl")
    assert sorted(logged) == list(range(1, TOTAL + 1))
    for step, losses in logged.items():  # steps after the checkpoint were logged twice: both equal the reference
        assert losses == [reference[step]] * len(losses), (step, losses, reference[step])


def test_larger_total_steps_continues_and_k_nonfinite_steps_stop_the_run(reference_run, shared, tmp_path):
    """Resume a finished run with larger total_steps on poisoned spike statistics (std 1e-45: the inputs overflow):
    the run resumes at TOTAL and skips the non-finite updates, logging their samples. With max_consecutive 3, a
    first resume to TOTAL + 2 ends normally after 2 skipped steps; the count survives the restart, so the next
    resume stops at its first skipped step (3 in a row) with a clear message and keeps the last checkpoint."""
    import shutil
    reference_dir, _ = reference_run
    workdir = tmp_path / "continued"
    shutil.copytree(reference_dir, workdir)
    root = next(Path(shared["embedded"]).glob("embedded-*"))
    stats = json.loads((root / "voxel_stats.json").read_text())
    stats["std"] = 1e-45  # passes the stats check (> 0), overflows float32 inputs to inf
    poisoned = tmp_path / "poisoned_stats.json"
    poisoned.write_text(json.dumps(stats))

    def resume(total_steps):
        return testing.run_main(workdir, "tiny", testing.tiny_overrides(
            shared["embedded"], shared["cache"], total_steps=total_steps, **{
                "data.stats_file": poisoned, "nonfinite.max_consecutive": 3, "eval.max_clips": 0}), check=False)

    first = resume(TOTAL + 2)
    assert first.returncode == 0, testing.tail(first)
    assert [s["step"] for s in testing.read_jsonl(workdir / "nonfinite_steps.jsonl")] == [TOTAL + 1, TOTAL + 2]
    second = resume(TOTAL + 4)
    assert second.returncode != 0
    assert "3 train steps in a row" in testing.tail(second) and "non-finite" in testing.tail(second)
    starts = [json.loads(r.read_text())["start_step"] for r in sorted((workdir / "run_records").glob("run_*.json"))]
    assert starts[-2:] == [TOTAL, TOTAL + 2]
    skipped = testing.read_jsonl(workdir / "nonfinite_steps.jsonl")
    assert [s["step"] for s in skipped] == [TOTAL + 1, TOTAL + 2, TOTAL + 3]
    assert all(s["samples"][0]["name"].startswith("train/") for s in skipped)
    last = sorted(int(p.name) for p in (workdir / "checkpoints" / "last").iterdir() if p.name.isdigit())
    assert last[-1] == TOTAL + 2


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _run_pair(workdir: Path, overrides: dict, log_dir: Path) -> None:
    """Runs the same main.py command as processes 0 and 1 of a jax.distributed job on localhost."""
    port = _free_port()
    procs, logs = [], []
    for process_id in range(2):
        flags = dict(overrides, **{"distributed.initialize": True, "distributed.coordinator_address": f"localhost:{port}",
                                   "distributed.num_processes": 2, "distributed.process_id": process_id,
                                   "distributed.initialization_timeout": 120})
        log = open(log_dir / f"process_{process_id}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(testing.main_command(workdir, "tiny", flags), cwd=testing.REPO_ROOT,
                                      env=testing.subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for process_id, code in enumerate(codes):
        text = (log_dir / f"process_{process_id}.log").read_text()
        assert code == 0, f"process {process_id} exited with {code}:\n" + "\n".join(text.splitlines()[-40:])


def test_two_processes_match_one_process_write_their_parts_and_resume(reference_run, shared, tmp_path):
    """Processes 0 and 1 (one CPU device each, parameters sharded over both: mesh data=1 x fsdp=2) train with the
    reference run's global batch: same losses (1e-6), both write their shards, the pair resumes, and the
    validation (clips split over the processes, sums reduced over them) gives the same PSNR."""
    reference_dir, _ = reference_run
    reference = {step: losses[0] for step, losses in testing.losses_by_step(
        reference_dir / "train_metrics.jsonl").items()}
    workdir = tmp_path / "pair"
    overrides = testing.tiny_overrides(shared["embedded"], shared["cache"], **{
        "mesh.fsdp": 2, "mesh.fsdp_min_size": 256, "eval.every_steps": 0, "eval.triptych_every_steps": 0})
    _run_pair(workdir, dict(overrides, total_steps=TOTAL - 2, **{"eval.max_clips": 0}), tmp_path)
    params_dir = workdir / "checkpoints" / "last" / str(TOTAL - 2) / "params"
    for process_id in range(2):  # each process wrote the shards it holds
        part = params_dir / f"ocdbt.process_{process_id}"
        assert part.is_dir() and any(f.is_file() for f in part.rglob("*")), part
    _run_pair(workdir, dict(overrides, total_steps=TOTAL), tmp_path)
    records = sorted((workdir / "run_records").glob("run_*.json"))
    assert [json.loads(r.read_text())["start_step"] for r in records] == [0, TOTAL - 2]
    assert json.loads(records[0].read_text())["jax"]["process_count"] == 2
    logged = testing.losses_by_step(workdir / "train_metrics.jsonl")
    assert sorted(logged) == list(range(1, TOTAL + 1))
    for step, losses in logged.items():
        np.testing.assert_allclose(losses, [reference[step]] * len(losses), rtol=1e-6, err_msg=f"step {step}")
    pair = json.loads((workdir / "metrics" / f"val_step_{TOTAL:07d}.json").read_text())
    single = json.loads((reference_dir / "metrics" / f"val_step_{TOTAL:07d}.json").read_text())
    assert pair["num_frames"] == single["num_frames"] == 4 and pair["process_count"] == 2
    assert pair["psnr"] == pytest.approx(single["psnr"], abs=1e-4)
    assert pair["ssim_y"] == pytest.approx(single["ssim_y"], abs=1e-6)


def test_warm_up_spike_dropout_ema_and_lora_resume_exactly_across_the_unfreeze(shared, tmp_path):
    """KAIR-style warm-up (the deformable convolutions frozen for the first 3 steps, then 0.125x) with spike dropout,
    an EMA and LoRA factors (rank 4): a run stopped at step 2 (N - 1) and resumed to 4 logs the same losses as the
    uninterrupted run, step by step, validates the same EMA, and the restorer loads the EMA (factors merged) from
    `last` and `best`."""
    overrides = testing.tiny_overrides(shared["embedded"], shared["cache"], total_steps=4, **{
        "optimizer.groups.deform.frozen_steps": 3, "optimizer.groups.deform.lr_multiplier": 0.125,
        "data.spike_dropout": 0.5, "optimizer.ema_decay": 0.5, "eval.triptych_every_steps": 0, "lora.rank": 4})
    straight = tmp_path / "straight"
    testing.run_main(straight, "tiny", overrides)
    stopped = tmp_path / "stopped"
    testing.run_main(stopped, "tiny", dict(overrides, total_steps=2))
    testing.run_main(stopped, "tiny", overrides)
    starts = [json.loads(r.read_text())["start_step"] for r in sorted((stopped / "run_records").glob("run_*.json"))]
    assert starts == [0, 2]
    reference = testing.losses_by_step(straight / "train_metrics.jsonl")
    assert sorted(reference) == [1, 2, 3, 4]
    assert testing.losses_by_step(stopped / "train_metrics.jsonl") == reference
    val = [json.loads((run / "metrics" / "val_step_0000004.json").read_text())["psnr"] for run in (straight, stopped)]
    assert val[0] == val[1]
    import orbax.checkpoint as ocp

    from vrtspike_jax.train import checkpointing

    last = [jax.tree.leaves(nnx_params(checkpointing.load_model_from_checkpoint(run, which="last")[0]))
            for run in (straight, stopped)]
    assert all(np.array_equal(a, b) for a, b in zip(*last))
    with ocp.StandardCheckpointer() as checkpointer:   # the raw parameters differ from the EMA the restorer loads
        raw = checkpointer.restore(straight / "checkpoints" / "last" / "4" / "params")
    assert set(raw) == {"vrt", "spike_encoder", "spike_temporal_sa", "cross_attn_fuse", "lora"}   # full state
    raw.pop("lora")
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), last[0]))
    # `best` (step 2 or 4, whichever validated better) holds the EMA of its step, as the `last` checkpoint of that
    # step does (checkpoints every 2 steps, 3 kept).
    (best_dir,) = [p for p in (straight / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    best = jax.tree.leaves(nnx_params(checkpointing.load_model_from_checkpoint(best_dir)[0]))
    same_step = jax.tree.leaves(nnx_params(checkpointing.load_model_from_checkpoint(
        straight / "checkpoints" / "last" / best_dir.name)[0]))
    assert all(np.array_equal(a, b) for a, b in zip(best, same_step))


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_a_tfp_run_and_its_restorer_follow_the_representation(shared, tmp_path, capsys):
    """Two tiny steps on TFP input (the embedded dataset gets its TFP cache on first use); the restorer reads the
    representation from the run's config and, from the .dat spikes, reproduces the run's validation PSNR."""
    from test_test_script import load_script

    workdir = tmp_path / "tfp"
    testing.run_main(workdir, "tiny", testing.tiny_overrides(shared["embedded"], shared["cache"], total_steps=2, **{
        "data.spike_representation": "tfp", "eval.triptych_every_steps": 0}))
    root = next(Path(shared["embedded"]).glob("embedded-*"))
    assert json.loads((root / "spike_stats_tfp_k4_h8.json").read_text())["split"] == "train"
    validation = json.loads((workdir / "metrics" / "val_step_0000002.json").read_text())
    seq = next((root / "val").iterdir())
    inputs = ["--checkpoint", str(workdir), "--input_blur", str(seq / "blur"), "--gt", str(seq / "sharp"),
              "--noprogress"]
    script = load_script()
    assert script.main(inputs + ["--input_spike", str(seq / "spike"), "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["input"]["spikes"]["spike_representation"] == "tfp_k4_h8"
    assert report["metrics"]["average"]["psnr"] == pytest.approx(validation["psnr"], abs=1e-3)
    # voxel counts are not what this run was trained on
    assert script.main(inputs + ["--input_spike_vox", str(seq / "spike_vox"), "--output", str(tmp_path / "v")]) == 2
    assert "trained on the tfp representation" in capsys.readouterr().err
