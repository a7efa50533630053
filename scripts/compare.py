r"""Compare training arms (VRT+spike against plain VRT, fusion variants, ...) over seeds, on the same data order,
steps and schedule, evaluated on the same validation and test sequences.

    python scripts/compare.py --config=configs/baseline.py:quick --arms spike,vrt_only --seeds 3 \
        --workdir=runs/cmp [--steps 300] [--robustness no_spikes,shift:1,noise:2] [--config.<key>=<value> ...]

Arms: `spike` is the config as given; any other arm is that variant of the config file applied on top (e.g.
`vrt_only`, `fuse14`). Arm a, seed i trains WORKDIR/<a>/seed_<config.seed + i> with training's own
`train_and_evaluate` (data order and parameters follow the seed, so every arm sees the same clips in the same
order), then its `best` checkpoint (selected on val) is evaluated on the val split and, when the data has one, the
test split, by training's validation (the tiled restorer on T-frame clips, KAIR metrics: docs/TRAINING.md).

Writes into WORKDIR:
  results.json, results.md   mean and standard deviation over seeds of PSNR (RGB, Y), SSIM (Y) (and LPIPS with
                             --config.eval.lpips_weights), overall and per sequence, per split; the blurry input;
                             training wall time per arm; the spike-only references (TFP and TFI of the centre
                             instant, scored on Y, window and grey map chosen on val: spike_only.json)
                             with --robustness, the spike arms' metrics with missing, shifted or noisier spikes
  val_psnr.png               validation PSNR against step, every arm (mean over seeds, band = +-1 std)
  frames/<split>__<seq>__<frame>.png   blurry | each arm (first seed) | sharp, labelled
Rerunning the same command resumes: finished trainings and evaluations are reused, an interrupted one continues
from its last checkpoint. Exit status 2 with one line for a bad flag, config, data or arm.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder of the comparison (one training workdir per arm and seed inside).")
flags.DEFINE_list("arms", ["spike", "vrt_only"], "Arms: 'spike' (the config as given) or variants of the config file.")
flags.DEFINE_integer("seeds", 3, "Seeds per arm: config.seed, config.seed + 1, ...")
flags.DEFINE_integer("steps", None, "Training steps per run (default: the config's total_steps).")
flags.DEFINE_list("robustness", [], "Also evaluate every spike arm's best checkpoint with perturbed spikes: "
                  "'no_spikes' (the input of a capture without spikes), 'shift:N' (spikes N bins (voxel) or "
                  "instants (tfp, tfi) late; N < 0: early; not for raw windows), 'noise:X' (the embedded data "
                  "re-simulated with X times its read noise, dark current and threshold mismatch, normalised with "
                  "the training data's statistics).")
flags.DEFINE_integer("frames", 4, "Side-by-side frames per split: one (the middle of its first clip) for each "
                     "of the first N sequences.")
config_flags.DEFINE_config_file("config", None, "Training configuration (a configs/*.py file, ':variant' args).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

METRICS = ("psnr", "psnr_y", "ssim_y", "lpips")
SPLITS = ("val", "test")


# ----------------------------------------------------------------------------------------------------------------
# Arms and runs


def config_module():
    """The module of the --config file (its VARIANTS make the arms)."""
    path = FLAGS["config"].config_filename.split(":")[0]
    spec = importlib.util.spec_from_file_location("compare_config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm_config(base, arm: str, seed: int, steps, variants: Mapping[str, Any]):
    """The training config of one arm and seed."""
    config = copy.deepcopy(base)
    if arm != "spike":
        variants[arm](config)
    config.seed = int(seed)
    if steps is not None:
        config.total_steps = int(steps)
    return config


def run_dir(workdir: Path, arm: str, seed: int) -> Path:
    return workdir / arm / f"seed_{seed}"


def train(config, folder: Path) -> float:
    """Trains one run (resuming an interrupted one; a finished one is reused) and returns its training wall time
    in seconds (of the start that finished it: the time of an interrupted start is not counted)."""
    from vrtspike_jax.train import train_lib

    record = folder / "compare_train.json"
    if record.exists():
        done = json.loads(record.read_text())
        if done["step"] >= int(config.total_steps):
            return float(done["wall_seconds"])
    summary = train_lib.train_and_evaluate(config, folder)
    if summary["step"] < int(config.total_steps):
        raise RuntimeError(f"{folder}: training stopped at step {summary['step']} of {config.total_steps}")
    record.write_text(json.dumps({"wall_seconds": float(summary["wall_seconds"]), "step": summary["step"]}))
    return float(summary["wall_seconds"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def parse_perturbation(name: str):
    """'no_spikes' | 'shift:N' | 'noise:X' -> (kind, value); ValueError naming the flag value otherwise."""
    kind, _, value = name.partition(":")
    try:
        if kind == "no_spikes" and not value:
            return kind, None
        if kind == "shift" and int(value) != 0:
            return kind, int(value)
        if kind == "noise" and float(value) >= 0:
            return kind, float(value)
    except ValueError:
        pass
    raise ValueError(f"--robustness {name}: expected 'no_spikes', 'shift:N' (N a non-zero number of voxel bins) or "
                     "'noise:X' (X >= 0, a factor on the embedded data's noise)")


def check_perturbation(kind: str, representation: str, name: str) -> None:
    """ValueError (one line) for a perturbation the spike representation cannot take. A shift moves the K channels
    of consecutive exposures along one time line (voxelize.shift_timeline): voxel bins tile it (exactly for
    exposures without gaps), TFP / TFI's bin-centre instants too (each value moves with its instant; its window
    stays clipped to the exposure it was computed in); raw windows (K frames around each exposure's centre) do not."""
    if kind == "shift" and representation == "raw":
        raise ValueError(f"--robustness {name} with data.spike_representation=raw: the raw windows (K spike frames "
                         "centred on each exposure) do not tile the time line, so they cannot be shifted along it; "
                         "use no_spikes or noise:X, or a voxel, tfp or tfi run")


class PerturbedSpikes:
    """An evaluation iterator whose spikes are replaced (no_spikes) or moved in time (shift): see --robustness."""

    def __init__(self, eval_iter, kind: str, value):
        self.eval_iter, self.kind, self.value = eval_iter, kind, value
        check_perturbation(kind, eval_iter.representation.kind, f"{kind}:{value}")
        self.zero = eval_iter.representation.no_spike_input(*eval_iter.stats)   # the input of no spikes

    def __len__(self) -> int:
        return len(self.eval_iter)

    def __iter__(self):
        import numpy as np

        from data_pipelines import voxelize

        for batch in self.eval_iter:
            batch = dict(batch)
            if self.kind == "no_spikes":
                batch["spike_vox"] = np.full_like(batch["spike_vox"], self.zero)
            else:
                batch["spike_vox"] = voxelize.shift_timeline(batch["spike_vox"], self.value, self.zero)
            yield batch


def eval_data(config, split: str, perturbation):
    """The data config that evaluates `split` (for 'noise:X', the re-simulated embedded data with the training
    data's statistics)."""
    from data_pipelines import input_pipeline, spike_input

    data = copy.deepcopy(config.data)
    data.eval_split = split
    if perturbation is not None and perturbation[0] == "noise":   # main() refuses it with a data.root
        train_root = input_pipeline.resolve_root(config.data)
        for key in ("noise_std", "dark_current", "threshold_std"):
            data.embedded[key] = float(data.embedded[key]) * perturbation[1]
        data.stats_file = str(train_root / spike_input.Representation.from_config(config.data).stats_name)
    return data


def evaluate(config, folder: Path, split: str, frames: int, perturbation=None):
    """Validation metrics of the run's `best` checkpoint on `split` (cached in the run folder); None when the data
    has no such split. `perturbation`: None or parse_perturbation's (kind, value) (no pictures then)."""
    from data_pipelines import input_pipeline, prepare
    from vrtspike_jax.inference import TileSpec, make_apply_fn
    from vrtspike_jax.train import checkpointing, validation

    tag = "" if perturbation is None else "_" + "".join(f"{v}" for v in perturbation if v is not None)
    cache = folder / f"compare_eval_{split}{tag}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    data = eval_data(config, split, perturbation)
    if split != "val" and not prepare.read_prepared(input_pipeline.resolve_root(data))["splits"].get(split):
        return None   # the data has no such split (the test split is optional)
    eval_iter = input_pipeline.create_eval_iterator(data, process_index=0, process_count=1)
    if perturbation is not None:
        frames = 0
        if perturbation[0] != "noise":
            eval_iter = PerturbedSpikes(eval_iter, *perturbation)
    model, _ = checkpointing.load_model_from_checkpoint(str(folder.resolve()), which="best")
    lpips = None
    if config.eval.lpips_weights:
        lpips = validation.LPIPSScorer(os.path.expanduser(str(config.eval.lpips_weights)),
                                       str(config.eval.lpips_convention))
    pictures = folder / "compare_frames"
    kept = set()

    def keep(seq: str, frame_idx: int, image) -> None:
        """The middle frame of the first clip of each of the first `frames` sequences."""
        if seq in kept or len(kept) >= frames:
            return
        kept.add(seq)
        validation.save_png(pictures / f"{split}__{seq.replace('/', '_')}__{frame_idx:06d}.png", image)

    result = validation.evaluate(
        make_apply_fn(model), eval_iter, tile=TileSpec.from_dict(dict(config.eval.tile)),
        spike_scale=int(config.data.spike_scale), use_spike=bool(config.model.use_spike),
        quantize=bool(config.eval.quantize), crop_border=int(config.eval.crop_border), lpips=lpips,
        triptych_clips=len(eval_iter) if frames else 0, on_triptych=keep)
    cache.write_text(json.dumps(result, indent=1, default=float))
    return result


def spike_only_reference(config, workdir: Path) -> Dict[str, Any]:
    """TFP and TFI reconstructions of the centre instant, scored on Y (vrtspike_jax/spike_reference.py; parameter
    and grey map chosen on val); cached in WORKDIR/spike_only.json."""
    from data_pipelines import input_pipeline
    from vrtspike_jax import spike_reference

    cache = workdir / "spike_only.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = spike_reference.reference(input_pipeline.resolve_root(config.data), SPLITS,
                                       crop_border=int(config.eval.crop_border))
    cache.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Aggregation and outputs


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    import numpy as np

    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def aggregate(evals: Mapping[str, List[Mapping[str, Any]]]) -> Dict[str, Any]:
    """{arm: [result per seed]} of one split -> arms' mean/std per metric and per sequence, plus the input."""
    out: Dict[str, Any] = {"arms": {}, "input": {}}
    for arm, results in evals.items():
        entry = {m: mean_std([r[m] for r in results]) for m in METRICS if m in results[0]}
        sequences = sorted(results[0]["per_sequence"])
        entry["per_sequence"] = {seq: {m: mean_std([r["per_sequence"][seq][m] for r in results])
                                       for m in METRICS if m in results[0]["per_sequence"][seq]}
                                 for seq in sequences}
        entry["num_frames"] = results[0]["num_frames"]
        out["arms"][arm] = entry
        out["input"] = {m: results[0][f"input_{m}"] for m in METRICS if f"input_{m}" in results[0]}
    return out


def _cell(stat: Mapping[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    lines = [f"# Comparison: {', '.join(results['arms'])} ({results['seeds']} seed(s), {results['steps']} steps)", "",
             f"Config `{results['config']}`; seeds {results['seed_values']}; metrics of the `best` checkpoint "
             "(selected on val) as mean ± std over seeds (KAIR conventions, docs/TRAINING.md).", ""]
    for split, table in results["splits"].items():
        metrics = [m for m in METRICS if m in next(iter(table["arms"].values()))]
        lines += [f"## {split} ({next(iter(table['arms'].values()))['num_frames']} frames)", "",
                  "| arm | " + " | ".join(metrics) + " | training wall time |",
                  "|---|" + "---|" * (len(metrics) + 1)]
        for arm, entry in table["arms"].items():
            wall = results["train_seconds"][arm]
            lines.append(f"| {arm} | " + " | ".join(_cell(entry[m], 4 if "ssim" in m or m == "lpips" else 2)
                                                 for m in metrics) + f" | {_cell(wall, 0)} s |")
        lines.append("| blurry input | " + " | ".join(f"{table['input'][m]:.4f}" if m in table["input"] and (
            "ssim" in m or m == "lpips") else f"{table['input'].get(m, float('nan')):.2f}" for m in metrics) + " | |")
        for method, ref in results.get("spike_only", {}).items():
            if split in ref["splits"]:
                scores = ref["splits"][split]
                cells = [f"{scores[m]:.4f}" if "ssim" in m else f"{scores[m]:.2f}" if m in scores else "-"
                         for m in metrics]
                lines.append(f"| spike only: {method.upper()} ({ref['param_name']} {ref['param']}, grey map fitted "
                             "on val; Y only) | " + " | ".join(cells) + " | |")
        sequences = sorted(next(iter(table["arms"].values()))["per_sequence"])
        lines += ["", f"PSNR per sequence ({split}):", "", "| sequence | " + " | ".join(table["arms"]) + " |",
                  "|---|" + "---|" * len(table["arms"])]
        for seq in sequences:
            lines.append(f"| {seq} | " + " | ".join(_cell(entry["per_sequence"][seq]["psnr"], 2)
                                                   for entry in table["arms"].values()) + " |")
        lines.append("")
    for split, by_arm in results.get("robustness", {}).items():
        names = list(next(iter(by_arm.values())))
        lines += [f"## Robustness ({split}): PSNR (RGB) of the spike arms with perturbed spikes", "",
                  "| arm | as trained | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for arm, by_name in by_arm.items():
            clean = results["splits"][split]["arms"][arm]["psnr"]
            lines.append(f"| {arm} | {_cell(clean, 2)} | " + " | ".join(_cell(by_name[n]["psnr"], 2) for n in names)
                         + " |")
        lines.append("")
    lines += ["![validation PSNR against step](val_psnr.png)", ""]
    return "\n".join(lines)


def plot_validation(workdir: Path, arms: Sequence[str], seeds: Sequence[int], out: Path) -> None:
    """Validation PSNR against step: mean over seeds per arm, +-1 std band; the blurry input dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vrtspike_jax.train import validation

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    baseline = None
    for arm in arms:
        curves = [{r["step"]: r["psnr"] for r in validation.read_metrics_jsons(run_dir(workdir, arm, s))}
                  for s in seeds]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        values = np.array([[c[s] for s in steps] for c in curves])
        mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
        line, = ax.plot(steps, mean, marker="o", label=arm)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        last = validation.read_metrics_jsons(run_dir(workdir, arm, seeds[0]))
        baseline = last[-1].get("input_psnr", baseline) if last else baseline
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="blurry input")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PSNR (dB, RGB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def side_by_side(workdir: Path, arms: Sequence[str], seed: int, out_dir: Path) -> List[Path]:
    """blurry | arm 1 | ... | sharp for every frame that every arm's first seed kept (from their triptychs)."""
    import numpy as np
    from PIL import Image

    from vrtspike_jax.train import validation

    folders = [run_dir(workdir, arm, seed) / "compare_frames" for arm in arms]
    names = sorted(set.intersection(*[{p.name for p in f.glob("*.png")} for f in folders]))
    written = []
    for name in names:
        panels = [np.asarray(Image.open(f / name).convert("RGB")) for f in folders]
        width = panels[0].shape[1] // 3
        row = [panels[0][:, :width]] + [p[:, width:2 * width] for p in panels] + [panels[0][:, 2 * width:]]
        labels = caption_band(["blurry"] + list(arms) + ["sharp"], width)
        path = out_dir / name
        validation.save_png(path, np.concatenate([labels, np.concatenate(row, axis=1)], axis=0))
        written.append(path)
    return written


CAPTION_HEIGHT = 14


def caption_band(labels: Sequence[str], width: int):
    """A white band with one label per panel (PIL's default font), uint8 [CAPTION_HEIGHT, len * width, 3]."""
    import numpy as np
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width * len(labels), CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(band)
    for i, label in enumerate(labels):
        draw.text((i * width + 2, 1), label, fill="black")
    return np.asarray(band)


# ----------------------------------------------------------------------------------------------------------------


def run(base, workdir: Path, arms: Sequence[str], num_seeds: int, steps, frames: int, variants,
        robustness: Sequence[str] = ()) -> Dict[str, Any]:
    seeds = [int(base.seed) + i for i in range(num_seeds)]
    wall: Dict[str, List[float]] = {arm: [] for arm in arms}
    evals: Dict[str, Dict[str, List[Any]]] = {split: {arm: [] for arm in arms} for split in SPLITS}
    perturbed: Dict[str, Dict[str, Dict[str, List[Any]]]] = {split: {} for split in SPLITS}
    for arm in arms:
        for seed in seeds:
            config = arm_config(base, arm, seed, steps, variants)
            folder = run_dir(workdir, arm, seed)
            logging.info("=== arm %s, seed %d: %s", arm, seed, folder)
            wall[arm].append(train(config, folder))
            for split in SPLITS:
                result = evaluate(config, folder, split, frames if seed == seeds[0] else 0)
                if result is None:
                    continue
                evals[split][arm].append(result)
                for name in robustness if config.model.use_spike else ():
                    result = evaluate(config, folder, split, 0, parse_perturbation(name))
                    perturbed[split].setdefault(arm, {}).setdefault(name, []).append(result)
    splits = {split: aggregate(by_arm) for split, by_arm in evals.items() if all(by_arm.values())}
    spike_only = spike_only_reference(base, workdir)
    results = {"config": FLAGS["config"].config_filename, "arms": list(arms), "seeds": num_seeds,
               "seed_values": seeds, "steps": int(steps if steps is not None else base.total_steps),
               "splits": splits, "spike_only": spike_only,
               "robustness": {split: {arm: {name: {m: mean_std([r[m] for r in rs]) for m in METRICS if m in rs[0]}
                                            for name, rs in by_name.items()} for arm, by_name in by_arm.items()}
                              for split, by_arm in perturbed.items() if by_arm},
               "train_seconds": {arm: mean_std(v) for arm, v in wall.items()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    (workdir / "results.md").write_text(markdown(results))
    plot_validation(workdir, arms, seeds, workdir / "val_psnr.png")
    results["frames"] = [str(p) for p in side_by_side(workdir, arms, seeds[0], workdir / "frames")]
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vrtspike_jax import cli
    from vrtspike_jax.train import preflight

    variants = getattr(config_module(), "VARIANTS", {})
    unknown = [arm for arm in FLAGS.arms if arm != "spike" and arm not in variants]
    if unknown or not FLAGS.arms or len(set(FLAGS.arms)) != len(FLAGS.arms):
        cli.exit_with_error(f"--arms {','.join(FLAGS.arms)}: each arm is 'spike' or a variant of "
                            f"{FLAGS['config'].config_filename.split(':')[0]} ({', '.join(sorted(variants))}), once")
    if FLAGS.seeds < 1 or (FLAGS.steps is not None and FLAGS.steps < 1) or FLAGS.frames < 0:
        cli.exit_with_error(f"--seeds {FLAGS.seeds} --steps {FLAGS.steps} --frames {FLAGS.frames}: seeds and steps "
                            "must be >= 1, frames >= 0")
    for name in FLAGS.robustness:
        try:
            kind, _ = parse_perturbation(name)
            check_perturbation(kind, str(FLAGS.config.data.spike_representation), name)
        except ValueError as error:
            cli.exit_with_error(error)
        if kind == "noise" and FLAGS.config.data.root:
            cli.exit_with_error(f"--robustness {name} re-simulates the embedded dataset; data.root="
                                f"{FLAGS.config.data.root} is recorded data")
    workdir = Path(os.path.expanduser(FLAGS.workdir)).resolve()
    try:
        for arm in FLAGS.arms:
            preflight.preflight(arm_config(FLAGS.config, arm, FLAGS.config.seed, FLAGS.steps, variants))
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(FLAGS.config, workdir, FLAGS.arms, FLAGS.seeds, FLAGS.steps, FLAGS.frames, variants,
                      FLAGS.robustness)
    except preflight.user_errors() as error:
        cli.exit_with_error(error)
    print((workdir / "results.md").read_text())
    print(f"wrote {workdir / 'results.json'}, {workdir / 'results.md'}, {workdir / 'val_psnr.png'} and "
          f"{len(results['frames'])} frame(s) in {workdir / 'frames'}")


if __name__ == "__main__":
    app.run(main)
