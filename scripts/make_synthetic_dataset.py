#!/usr/bin/env python
"""Build the embedded synthetic dataset (real photographs, simulated camera shake, simulated spikes).

  python scripts/make_synthetic_dataset.py --out DIR [--seed N] [--height 128 --width 128 ...]
  python scripts/make_synthetic_dataset.py --out DIR --val_sequences 3 --test_sequences 3 --blur_px 6 \
      --blur_px_max 24 --spike_scale 2 --noise_std 0.1 --dark_current 0.005 --threshold_std 0.05   # the bench data

Every field of data_pipelines.synthetic.SyntheticSpec is a flag (its docstring says what each means).

Writes our layout (docs/DATA.md) into DIR and, unless --noprepare, prepares it (voxel cache, train-only
statistics, index) like scripts/prepare_data.py. Deterministic: the same flags give the same files.
Exit status 0 on success, 2 on bad flags or a failed build (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from data_pipelines.synthetic import SyntheticSpec  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (our layout)")
    defaults = SyntheticSpec()
    for field in dataclasses.fields(SyntheticSpec):
        p.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name), help=f"(default {getattr(defaults, field.name)})")
    p.add_argument("--num_bins", type=int, default=32, help="K for the voxel cache (default 32)")
    p.add_argument("--noprepare", action="store_true", help="only render; do not run prepare_data")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
    try:
        spec.validate()
    except ValueError as err:
        p.error(str(err))
    return args, spec


def main(argv=None) -> int:
    args, spec = parse_args(argv)
    from data_pipelines import prepare, synthetic

    start = time.time()
    out = Path(args.out).expanduser()
    synthetic.make_dataset(out, spec, progress=True)
    test = f" + {spec.test_sequences} test" if spec.test_sequences else ""
    print(f"rendered {spec.train_sequences} train + {spec.val_sequences} val{test} sequences of "
          f"{spec.height}x{spec.width} into {out} ({time.time() - start:.1f} s)")
    if args.noprepare:
        return 0
    result = prepare.prepare_root(prepare.PrepareOptions(root=out, num_bins=args.num_bins, workers=1,
                                                         progress=False))
    print(f"prepared in {result.seconds:.1f} s: {prepare.summary_line(result)}; total {time.time() - start:.1f} s")
    return 0 if result.exit_code == 0 else 2


if __name__ == "__main__":
    debug = "--debug" in sys.argv
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
