"""The training loop's policies, in process: the Validator (input baseline measured once, metrics JSON, triptychs
when due), the best-checkpoint policy (RunCheckpoints.keep_if_best) and the step log (train_metrics.jsonl,
nonfinite_steps.jsonl, the stop after K non-finite steps in a row)."""
import json

import numpy as np
import pytest

import helpers as testing
from configs import baseline
from data_pipelines import input_pipeline
from vrtspike_jax.train import checkpointing, train_lib, validation


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def write_scalars(self, step, values):
        self.scalars.setdefault(step, {}).update(values)

    def write_images(self, step, images):
        self.images.setdefault(step, {}).update(images)


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    root = testing.make_tiny_root(tmp_path_factory.mktemp("validator_data"), num_bins=4)
    config = baseline.get_config("tiny")
    config.data.root = str(root)
    config.eval.triptych_every_steps = 2
    return config, input_pipeline.create_eval_iterator(config.data, process_index=0, process_count=1)


def test_the_validator_measures_the_input_once_and_writes_what_is_due(tiny_eval, tmp_path, monkeypatch):
    config, eval_iter = tiny_eval
    asked = []
    evaluate = validation.evaluate

    def recording_evaluate(*args, **kwargs):
        asked.append(kwargs["want_input_metrics"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(validation, "evaluate", recording_evaluate)
    writer = RecordingWriter()
    validator = validation.Validator(config, tmp_path, eval_iter, writer, use_spike=True, total_steps=4)
    identity = validator(1, lambda frames, spikes: frames)          # the blurry input, restored as it is
    assert identity["psnr"] == identity["input_psnr"] and identity["psnr_gain_over_input"] == 0.0
    saved = json.loads((tmp_path / "metrics" / "val_step_0000001.json").read_text())
    assert saved["step"] == 1 and saved["psnr"] == identity["psnr"] and saved["conventions"] == validation.CONVENTIONS
    assert not (tmp_path / "triptychs").exists() and 1 not in writer.images      # step 1: no triptych due
    darker = validator(2, lambda frames, spikes: 0.5 * frames)
    assert asked == [True, False]                                  # the input's metrics: measured once, reused
    assert darker["input_psnr"] == identity["input_psnr"] and darker["psnr_gain_over_input"] < -3
    pngs = sorted((tmp_path / "triptychs").glob("step_0000002_*.png"))
    assert len(pngs) == min(int(config.eval.num_triptychs), len(eval_iter)) > 0
    assert sorted(writer.images[2]) == sorted(f"triptych/{p.stem[len('step_0000002_'):]}" for p in pngs)
    assert writer.scalars[2]["val/psnr"] == darker["psnr"] and writer.scalars[2]["val/seconds"] > 0
    assert validator.triptychs_due(4) and not validator.triptychs_due(3)   # the last step always gets them
    other = validation.Validator(config, tmp_path / "other", eval_iter, RecordingWriter(), use_spike=True,
                                 total_steps=4, is_main=False)
    other(2, lambda frames, spikes: frames)
    assert not (tmp_path / "other").exists()                       # only process 0 writes files


def test_best_is_kept_only_for_a_finite_psnr_above_every_earlier_one(tmp_path):
    params = {"w": np.arange(3, dtype=np.float32)}
    saver = checkpointing.RunCheckpoints(tmp_path, async_save=False)
    outcomes = [saver.keep_if_best(step, params, {"next_step": step}, {"seed": 1}, {"psnr": psnr, "ssim": 0.5})
                for step, psnr in ((1, 20.0), (2, 19.0), (3, float("nan")), (4, 21.0), (5, 21.0))]
    assert outcomes == [True, False, False, True, False]
    saver.wait_until_finished()
    saver.close()
    again = checkpointing.RunCheckpoints(tmp_path, async_save=False)       # a restart knows the kept best
    assert not again.keep_if_best(6, params, {"next_step": 6}, {"seed": 1}, {"psnr": 20.5})
    assert again.keep_if_best(7, params, {"next_step": 7}, {"seed": 1}, {"psnr": 21.5})
    again.wait_until_finished()
    again.close()
    assert checkpointing.resolve_checkpoint_dir(tmp_path).name == "7"
    assert json.loads((tmp_path / "checkpoints/best/7/metrics/metrics").read_text()) == {"psnr": 21.5}


def test_the_step_log_writes_windows_and_nonfinite_steps_and_stops_after_k_in_a_row(tmp_path):
    writer = RecordingWriter()
    log = train_lib.StepLog(tmp_path, writer, 2, in_row=1, samples_of=lambda step: [{"name": f"clip{step}"}],
                            last_checkpoint=lambda: 40)
    good = {"loss": 1.0, "charbonnier": 1.0, "perceptual": 0.0, "grad_norm": 2.0, "learning_rate": 1e-3, "finite": 1.0}
    bad = dict(good, loss=float("nan"), finite=0.0)
    log.finish(40, good)                                  # a resume at 1 in a row: a finite step resets the count
    log.finish(41, dict(good, loss=3.0))
    log.write_window(42)
    assert testing.read_jsonl(tmp_path / "train_metrics.jsonl") == [
        {"step": 42, "loss": 2.0, "charbonnier": 1.0, "perceptual": 0.0, "grad_norm": 2.0, "learning_rate": 1e-3,
         "nonfinite_steps": 0.0}]
    assert writer.scalars[42]["train/loss"] == 2.0
    log.finish(42, bad)
    assert log.in_row == 1 and testing.read_jsonl(tmp_path / "nonfinite_steps.jsonl")[0]["samples"] == [
        {"name": "clip42"}]
    with pytest.raises(train_lib.NonFiniteLossError, match=r"2 train steps in a row \(up to step 44\).*the last "
                       r"checkpoint \(step 40\)"):
        log.finish(43, bad)
    quiet = train_lib.StepLog(tmp_path / "other", RecordingWriter(), 2, is_main=False)
    quiet.finish(0, bad)
    quiet.write_window(1)
    assert not (tmp_path / "other").exists()              # only process 0 writes files
