r"""Where the train step's memory peak sits: XLA's buffers live at the peak, by model part and op kind.

    python scripts/memory_breakdown.py --config configs/baseline.py --frames 5 --height 256 --width 256
    python scripts/memory_breakdown.py --config configs/baseline.py:vrt_only --frames 6 --height 64 --width 64 \
        --dtype bfloat16 --json runs/memory_6x64.json

It compiles (does not run) the step `scripts/benchmark.py` times, which is the step training runs, with every
argument after the script's own passed to benchmark.py (`--mode train --runs 0 --warmup 0` are added), and asks
XLA to dump that program's buffer assignment into a temporary folder. XLA's live-range report names every buffer
alive at the peak of its schedule and the instruction that runs there; each buffer's HLO instruction carries the
JAX name stack of the code that made it. The model names its parts with `jax.named_scope` (embed, spynet,
compose_flows, spike_encoder, stage1..stage7 with tmsa_mutual / tmsa_self / parallel_warp inside, attention and
mlp inside each TMSA block, fusion1..fusion7 for the spike fusion, stage8_1.., reconstruct, loss; the train step
adds optimizer for the update), so the report can say, per part and per op kind (gather, dot_general, ...), how
many bytes are held at the peak, and whether they belong to the forward pass (`jvp`) or the backward pass
(`transpose`).

Output: the peak (XLA's heap-simulator figure: temporaries plus the arguments it counts), the instruction at the
peak with its name stack, then tables by part, by (part, sub-part), by op kind and the largest buffers. `--json`
writes them all. `--keep_dump DIR` keeps XLA's dump (several hundred MB of files). Exit status 2 with one line for
a bad flag; the benchmark's own errors are passed through.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from vrtspike_jax import cli   # argparse only: the compile runs in benchmark.py's process

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = REPO_ROOT / "scripts" / "benchmark.py"
MODULE = "jit_train_step"

# Name-scope tokens of the model (jax.named_scope in models/ and train_lib), outermost first.
PART = re.compile(r"^(embed|spynet|compose_flows|spike_encoder|stage\d+(?:_\d+)?|fusion\d+|reconstruct|loss|"
                  r"optimizer)$")
SUB_PART = re.compile(r"^(tmsa_mutual|tmsa_self|parallel_warp|attention|mlp)$")
_LIVE_HEADER = re.compile(r"^\s*Live ranges at (\d+) \(peak\):")
_LIVE_ENTRY = re.compile(r"^\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes")
_PEAK_TOTAL = re.compile(r"Stack trace breakdown for peak usage: ([\d ]+) bytes")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class BreakdownError(Exception):
    """A failure with a one-line message."""


def breakdown_parser(script: str, doc: str, keep_flag: str, keep_help: str) -> argparse.ArgumentParser:
    """The flags of the breakdown scripts (--top, --json and the keep flag); the rest goes to benchmark.py."""
    parser = cli.ArgumentParser(prog=Path(script).name, description=doc, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=12, help="rows of each table (default 12)")
    parser.add_argument("--json", default=None, help="write the breakdown here")
    parser.add_argument(keep_flag, default=None, help=keep_help)
    return parser


def parse_breakdown_args(parser: argparse.ArgumentParser, argv: List[str], owned: Tuple[str, ...],
                         why: str) -> Tuple[argparse.Namespace, List[str]]:
    """(the script's own flags, benchmark.py's); one-line errors for --top < 1 and for a benchmark flag the script
    sets itself (`owned`, `why` it does)."""
    args, rest = parser.parse_known_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: must be at least 1")
    for flag in owned:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            parser.error(f"{flag} is set by this script ({why})")
    return args, rest


def split_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    parser = breakdown_parser(__file__, __doc__, "--keep_dump", "keep XLA's dump in this folder")
    return parse_breakdown_args(parser, argv, ("--mode", "--runs", "--warmup"), "it compiles the train step only")


def dump_flags(folder: Path) -> str:
    """XLA_FLAGS that dump the train step's optimised HLO and buffer assignment into `folder`."""
    return f"--xla_dump_to={folder} --xla_dump_hlo_module_re={MODULE}"


def compile_with_dump(benchmark_args: List[str], folder: Path) -> dict:
    """Runs benchmark.py compile-only with the dump flags; returns its JSON report."""
    report = folder / "benchmark.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {dump_flags(folder)}".strip()
    command = [sys.executable, str(BENCHMARK), *benchmark_args, "--mode", "train", "--runs", "0", "--warmup", "0",
               "--json", str(report)]
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise BreakdownError(f"benchmark.py stopped with status {result.returncode} (its message is above)")
    return json.loads(report.read_text())


def find_dump_file(folder: Path, suffix: str, module: str = MODULE) -> Path:
    matches = sorted(glob.glob(str(folder / f"*.{module}.*after_optimizations{suffix}")))
    if not matches:
        raise BreakdownError(f"no XLA dump '*.{module}.*after_optimizations{suffix}' in {folder}: the XLA of this "
                             f"jax does not write it")
    return Path(matches[-1])


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")


class Instruction(NamedTuple):
    """One instruction of an HLO text dump."""
    opcode: str
    shape: str                     # the result shape
    op_name: str                   # the JAX name stack ("" when XLA left none)
    computation: Optional[str]     # the computation it is in
    operands: Tuple[str, ...]
    calls: Optional[str]           # the computation a fusion calls


UNKNOWN = Instruction("?", "?", "", None, (), None)


def read_instructions(hlo_text: Iterable[str]) -> Dict[str, Instruction]:
    """Instruction name -> Instruction, for every instruction of an HLO text dump."""
    out, computation = {}, None
    for line in hlo_text:
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m:
            op_name = _OP_NAME.search(line)
            calls = _CALLS.search(line) if m.group(3) == "fusion" else None
            out[m.group(1)] = Instruction(m.group(3), m.group(2), op_name.group(1) if op_name else "", computation,
                                          tuple(_OPERAND.findall(line[m.end():].split("), ", 1)[0])),
                                          calls.group(1) if calls else None)
    return out


def kernels_by_part(instructions: Dict[str, Instruction], top: int) -> List[dict]:
    """How many fusions (each one kernel that XLA:CPU generates code for) each model part has, outside the fused
    computations themselves: where the code generation time of the compile goes."""
    fused = {i.calls for i in instructions.values() if i.calls}
    counts = collections.Counter()
    for i in instructions.values():
        if i.opcode == "fusion" and i.computation not in fused:
            c = classify("fusion", i.op_name)
            counts[(c["part"], c["sub_part"])] += 1
    total = sum(counts.values())
    return [{"part": part, "sub_part": sub, "kernels": n, "share": n / total}
            for (part, sub), n in counts.most_common(top)] + [{"part": "(all)", "sub_part": "-", "kernels": total,
                                                               "share": 1.0}]


def read_peak(live_range_text: Iterable[str]) -> Tuple[int, List[Tuple[str, int]], Optional[int]]:
    """(position of the peak in the schedule, [(instruction, bytes)] live there, the peak's total bytes)."""
    position, entries, total, inside = None, [], None, False
    for line in live_range_text:
        header = _LIVE_HEADER.match(line)
        if header:
            position, inside = int(header.group(1)), True
            continue
        if inside:
            entry = _LIVE_ENTRY.match(line)
            if entry:
                entries.append((entry.group(1), int(entry.group(2))))
                continue
            inside = False
        peak = _PEAK_TOTAL.search(line)
        if peak:
            total = int(peak.group(1).replace(" ", ""))
    if position is None:
        raise BreakdownError("XLA's live-range report has no 'Live ranges at N (peak)' section")
    return position, entries, total


def schedule_at(live_range_text: List[str], position: int) -> Optional[str]:
    """The instruction at `position` of the live-range report's InstructionSequence."""
    pattern = re.compile(rf"^\s*{position}:(\S+)")
    for line in live_range_text:
        m = pattern.match(line)
        if m:
            return m.group(1)
        if "BufferLiveRange:" in line:
            break
    return None


def classify(opcode: str, op_name: str) -> Dict[str, str]:
    """part, sub-part, pass and op kind of a buffer from its instruction's opcode and JAX name stack. The part is the
    innermost part scope (embed/spynet: spynet), the sub-parts are all sub-part scopes, outermost first."""
    if opcode == "parameter":
        return {"part": "(arguments)", "sub_part": "-", "pass": "-", "op": "parameter"}
    tokens = [t for t in re.split(r"[/()]", op_name) if t]
    parts = [t for t in tokens if PART.match(t)]
    subs = [t for t in tokens if SUB_PART.match(t)]
    direction = "backward" if "transpose(" in op_name else ("forward" if op_name else "-")
    op = tokens[-1] if tokens else opcode
    return {"part": parts[-1] if parts else "(unscoped)", "sub_part": "/".join(dict.fromkeys(subs)) or "-",
            "pass": direction, "op": op}


def breakdown(folder: Path, top: int, module: str = MODULE) -> dict:
    """The breakdown of the peak of XLA's dump of `module` in `folder` (see the module docstring)."""
    instructions = read_instructions(find_dump_file(folder, ".txt", module).read_text().splitlines())
    live_lines = find_dump_file(folder, "-live-range.txt", module).read_text().splitlines()
    position, entries, total = read_peak(live_lines)
    at_peak = schedule_at(live_lines, position)
    rows = []
    for name, size in entries:
        i = instructions.get(name, UNKNOWN)
        rows.append(dict(classify(i.opcode, i.op_name), instruction=name, bytes=size, shape=i.shape, op_name=i.op_name))

    def table(keys):
        sums = collections.Counter()
        for row in rows:
            sums[tuple(row[k] for k in keys)] += row["bytes"]
        return [dict(zip(keys, key), bytes=size) for key, size in sums.most_common(top)]

    peak = instructions.get(at_peak or "", UNKNOWN)
    live = sum(r["bytes"] for r in rows)
    return {"peak_bytes": total if total is not None else live, "live_bytes": live, "buffers": len(rows),
            "peak_instruction": at_peak, "peak_op_name": peak.op_name,
            "peak_classified": classify(peak.opcode, peak.op_name),
            "by_part": table(["part"]), "by_part_and_sub_part": table(["part", "sub_part", "pass"]),
            "by_op": table(["pass", "op"]),
            "largest": sorted(rows, key=lambda r: -r["bytes"])[:top],
            "kernels_by_part": kernels_by_part(instructions, top)}


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}"


def print_report(result: dict) -> None:
    live = result["live_bytes"]
    print(f"peak: {gib(result['peak_bytes'])} GiB (XLA's heap simulation); {gib(live)} GiB in "
          f"{result['buffers']} buffers live at the peak")
    c = result["peak_classified"]
    print(f"the peak is at {result['peak_instruction']}: part {c['part']}, {c['sub_part']}, {c['pass']} pass "
          f"({result['peak_op_name']})")
    for title, key, key_names in (("by part", "by_part", ["part"]),
                                  ("by part, sub-part and pass", "by_part_and_sub_part", ["part", "sub_part", "pass"]),
                                  ("by op kind", "by_op", ["pass", "op"])):
        print(f"\n{title}:")
        print(" | ".join(key_names + ["GiB", "share"]))
        for row in result[key]:
            print(" | ".join([str(row[k]) for k in key_names] + [gib(row["bytes"]), f"{row['bytes'] / live:.1%}"]))
    print("\nfusion instructions by part and sub-part (XLA:CPU generates code for each; a proxy for the compile time):")
    print("part | sub_part | kernels | share")
    for row in result["kernels_by_part"]:
        print(f"{row['part']} | {row['sub_part']} | {row['kernels']} | {row['share']:.1%}")
    print("\nlargest buffers:")
    print("GiB | shape | part | sub_part | pass | op | instruction")
    for row in result["largest"]:
        print(f"{gib(row['bytes'])} | {row['shape']} | {row['part']} | {row['sub_part']} | {row['pass']} | "
              f"{row['op']} | {row['instruction']}")


def run_breakdown(script: str, keep: Optional[str], prefix: str, phase: str,
                  work: Callable[[Path], Tuple[dict, dict]], summarize: Callable[[dict], dict],
                  benchmark_args: List[str], report: Callable[[dict], None], json_path: Optional[str]) -> int:
    """The common run of the breakdown scripts: work(folder) -> (benchmark.py's JSON report, the breakdown) in a
    scratch folder (kept when `keep` names one), a one-line error naming `script` for a BreakdownError, then the
    breakdown with summarize(the report's `phase` result) printed by `report` and written to `json_path`."""
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        bench, result = work(folder)
    except BreakdownError as exc:
        print(f"error: {script}: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    measured = next((r for r in bench.get("results", []) if r.get("phase") == phase), {})
    result.update(phase=phase, benchmark=summarize(measured), benchmark_args=benchmark_args)
    print()
    report(result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {json_path}")
    return 0


def main(argv=None) -> int:
    args, benchmark_args = split_args(sys.argv[1:] if argv is None else argv)
    return run_breakdown(
        Path(__file__).name, args.keep_dump, "vrtspike-xla-dump-", "train",
        lambda folder: (compile_with_dump(benchmark_args, folder), breakdown(folder, args.top)),
        lambda train: {"compile_s": train.get("compile_s"), "flops": train.get("flops"),
                       **(train.get("xla_memory_bytes") or {})},
        benchmark_args, print_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
