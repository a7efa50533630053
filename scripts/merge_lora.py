#!/usr/bin/env python
"""Fold a LoRA run's factors into plain VRT weights: a checkpoint of the plain model (no LoRA) with the same frames.

    python scripts/merge_lora.py --checkpoint runs/lora --output runs/lora_merged
    python scripts/merge_lora.py --checkpoint runs/lora --which last --output runs/lora_merged_last
    python scripts/test.py --checkpoint runs/lora_merged ...        # restores as any plain run

--checkpoint takes what scripts/test.py takes (a workdir, its checkpoints/ folder, a manager folder or one step
folder); --which best (default: the best by validation PSNR) or last; --step a given step. A run with an EMA gives
its EMA weights (as validation and the restorer use them). The output is a workdir holding one `best` checkpoint:
`OUT/checkpoints/best/<step>/` with the merged parameters, the run config with `lora.rank = 0`, the source's
validation metrics (when it was a `best` checkpoint) and, in its data item, `merged_from` (the source step folder)
and the LoRA settings. Every kernel is `W + (alpha / rank) a @ b` in float32 (vrtspike_jax/train/lora.py).

A user error (no checkpoint there, a run without LoRA, an output folder that already holds checkpoints) is one line
on stderr, exit status 2, and nothing is written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vrtspike_jax import runtime
from vrtspike_jax.cli import ArgumentParser, UsageError, exit_with_error

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)


def merge_checkpoint(checkpoint: str, output: str, which: str = "best", step: int | None = None) -> Path:
    """Writes the merged `best` checkpoint into the workdir `output`; returns its step folder."""
    import jax
    import numpy as np
    from flax import nnx

    from vrtspike_jax.train import checkpointing, lora, run_config

    step_dir = checkpointing.resolve_checkpoint_dir(checkpoint, step, which)
    config_dict = run_config.to_dict(run_config.read(json.loads((step_dir / "config" / "metadata").read_text()),
                                                     fill_defaults=True))
    spec = lora.spec_from_config(config_dict)
    if spec is None:
        raise UsageError(f"--checkpoint {step_dir}: this run has no LoRA (lora.rank is 0); its weights are plain")
    out = Path(output).expanduser()
    if (out / checkpointing.CHECKPOINT_DIR).exists():
        raise UsageError(f"--output {out}: already holds {checkpointing.CHECKPOINT_DIR}/; give a new folder")
    model, _ = checkpointing.load_model_from_checkpoint(step_dir)      # the factors are folded in on loading
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    metrics_file = step_dir / "metrics" / "metrics"
    metrics = (json.loads(metrics_file.read_text()) if metrics_file.is_file()
               else {checkpointing.BEST_METRIC: float("nan")})   # a `last` checkpoint was never validated
    merged_config = {**config_dict, "lora": {**config_dict["lora"], "rank": 0}}
    position = {**json.loads((step_dir / "data" / "metadata").read_text()), "merged_from": str(step_dir.resolve()),
                "lora": config_dict["lora"]}
    saved_step = int(step_dir.name)
    checkpoints = checkpointing.RunCheckpoints(out, keep_last=1, keep_best=1, async_save=False)
    try:
        checkpoints.save_best(saved_step, params, position, merged_config, metrics)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()
    return out / checkpointing.CHECKPOINT_DIR / checkpointing.BEST / str(saved_step)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a LoRA run's workdir, checkpoints folder or step folder")
    parser.add_argument("--output", required=True, help="a new workdir for the merged checkpoint")
    parser.add_argument("--which", default="best", choices=["best", "last"])
    parser.add_argument("--step", type=int, default=None, help="the step to merge (default: best or newest)")
    args = parser.parse_args(argv)
    from vrtspike_jax.train.checkpointing import CheckpointNotFoundError, CheckpointReadError

    try:
        written = merge_checkpoint(args.checkpoint, args.output, args.which, args.step)
    except (UsageError, CheckpointNotFoundError, CheckpointReadError) as err:
        exit_with_error(err)
    print(f"wrote the merged plain-VRT checkpoint {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
