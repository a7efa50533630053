"""Measurements of the data path (numbers quoted in docs/DATA.md). Not run by the tests.

  python -m data_pipelines.bench dat                      # .dat decode MB/s (file bytes), one core
  python -m data_pipelines.bench pipeline --height 720 --width 1280 --spike_scale 4
                                                          # train pipeline samples/s at crop 256, T=5, K=32
  python -m data_pipelines.bench embedded                 # time to build + prepare the default embedded dataset
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}"


def bench_dat(repeats: int = 5) -> None:
    from data_pipelines import spike_dat

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for height, width, frames in ((250, 400, 2000), (180, 320, 2000), (250, 404, 1000)):
            path = Path(tmp) / f"s{height}x{width}.dat"
            spike_dat.write_dat(path, rng.random((frames, height, width)) < 0.2)
            size = path.stat().st_size
            for window in (137, frames):
                speeds = []
                for _ in range(repeats):
                    with spike_dat.SpikeDatReader(path, height, width) as reader:
                        start = time.perf_counter()
                        for s in range(0, frames - window + 1, window):
                            reader.read(s, s + window)
                        elapsed = time.perf_counter() - start
                    speeds.append((frames // window) * window * reader.frame_bytes / elapsed / 1e6)
                print(f"dat {width}x{height} (WxH), file {size / 1e6:.1f} MB, ranges of {window} frames: "
                      f"median {statistics.median(speeds):.0f} MB/s (min {min(speeds):.0f}, max {max(speeds):.0f})")


def bench_pipeline(height: int, width: int, spike_scale: int, batch: int, steps: int, workdir: str,
                   parallel: int) -> None:
    from data_pipelines import input_pipeline, synthetic, prepare

    spec = synthetic.SyntheticSpec(height=height, width=width, train_sequences=2, val_sequences=1, train_frames=10,
                                   val_frames=5, subframes=8, spike_scale=spike_scale, seed=0)
    root = Path(workdir) / f"bench-{height}x{width}-f{spike_scale}"
    if not (root / "prepared.json").exists():
        start = time.time()
        synthetic.make_dataset(root, spec)
        prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
        print(f"(built benchmark data {root} in {time.time() - start:.0f} s)")
    cfg = input_pipeline.default_data_config()
    cfg.root, cfg.crop_size, cfg.spike_scale, cfg.clip_length, cfg.num_bins = str(root), 256, spike_scale, 5, 32
    cfg.num_parallel_calls = parallel
    it = input_pipeline.create_train_iterator(cfg, global_batch_size=batch, seed=0, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        rates.append(steps * batch / (time.perf_counter() - start))
    print(f"train pipeline, frames {height}x{width}, spike_scale {spike_scale}, crop 256, T=5, K=32, batch {batch}, "
          f"num_parallel_calls {parallel}: median {statistics.median(rates):.1f} samples/s "
          f"(runs {', '.join(f'{r:.1f}' for r in rates)}) on {_machine()}")


def bench_embedded(workdir: str) -> None:
    from data_pipelines import synthetic

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        root = synthetic.ensure_dataset(tmp, synthetic.SyntheticSpec())
        elapsed = time.perf_counter() - start
    print(f"embedded dataset (default spec) built and prepared in {elapsed:.1f} s on {_machine()} ({root.name})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dat", "pipeline", "embedded"])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--spike_scale", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=-1, help="num_parallel_calls (-1 AUTOTUNE)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    if args.what == "dat":
        bench_dat()
    elif args.what == "pipeline":
        bench_pipeline(args.height, args.width, args.spike_scale, args.batch, args.steps, args.workdir, args.parallel)
    else:
        bench_embedded(args.workdir)


if __name__ == "__main__":
    main()
