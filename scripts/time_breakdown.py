r"""Where the train step's time goes: one profiled call of the step, by model part and op kind.

    python scripts/time_breakdown.py --config configs/baseline.py:vrt_only --frames 6 --height 64 --width 64
    python scripts/time_breakdown.py --config configs/baseline.py:tiny --json runs/time_tiny.json
    python scripts/time_breakdown.py --phase forward --config configs/baseline.py:vrt_only --frames 6

It runs the step `scripts/benchmark.py` times (the step training runs; `--phase forward`: the inference call) with
every argument after the script's own passed to benchmark.py (`--mode <phase>`; `--runs 1 --warmup 1` unless
given), and asks benchmark.py to trace one
more call with jax.profiler (`--profile_dir`) while XLA dumps that program's optimised HLO. XLA:CPU writes a trace
event per executed HLO instruction when `--xla_cpu_enable_xprof_traceme=true` (this script sets it; it costs a
little time, and the traced call is not one of the timed ones). Each event names its instruction; the instruction
carries the JAX name stack of the code that made it, and the model names its parts with `jax.named_scope` (see
scripts/memory_breakdown.py, whose attribution this script shares). So the report says how much of the step each
part, sub-part (attention, mlp, parallel_warp, ...), pass (forward `jvp`, backward `transpose`) and op kind takes.

Times are self times: an event's duration less the events nested in it on the same thread (XLA:CPU traces the
instructions inside loops, not the loop), plus, for convolutions and dots, their asynchronous tails. XLA:CPU runs
those two on Eigen's thread pool: the traced event ends when the kernel is launched, and the work goes on with no
event on any thread (in the tiny step, 2026-12-03: 63 ms of convolution events in a 1.38 s call with 0.61 s of
stretches in which no traced instruction ran, 0.33 s of them starting as a convolution's launch ended). So every
stretch of at least MIN_ASYNC_GAP_US in which no traced instruction runs is attributed to the convolution or dot
the executor waited for (`async_tails`); shorter stretches are the executor's own time between instructions and
stay unattributed. Several instructions can run at once (XLA:CPU's thunk executor runs independent ones
concurrently), so the sum can differ from the call's wall time; the report prints the self times, the tails,
what stayed unattributed and the call's time, and the shares are of the attributed sum. The kernel kind of an
instruction is the heaviest operation it contains (convolution > dot > scatter > gather > reduce-window > reduce >
sort > copy/transpose > elementwise).

Output: tables by part, by (part, sub-part, pass), by innermost sub-part, by op kind (the JAX primitive), by kernel
kind and the slowest instructions. `--json` writes them all; `--keep DIR` keeps the trace and XLA's dump. Exit
status 2 with one line for a bad flag; the benchmark's own errors are passed through.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_breakdown import (BENCHMARK, MODULE, UNKNOWN, BreakdownError, Instruction,  # noqa: E402
                              breakdown_parser, classify, find_dump_file, parse_breakdown_args, read_instructions,
                              run_breakdown)


TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
PHASE_MODULES = {"train": MODULE, "forward": "jit_forward"}   # benchmark.py's phase -> its jitted function
# Instructions XLA:CPU launches on Eigen's thread pool and completes after their traced event (module docstring).
ASYNC_OPCODES = ("convolution", "dot")
MIN_ASYNC_GAP_US = 50.0
# Heaviest first: a fusion's kernel kind is the first of these its fused computation contains.
KERNEL_KINDS = (("convolution", "convolution"), ("dot", "dot"), ("scatter", "scatter"), ("gather", "gather"),
                ("reduce-window", "reduce-window"), ("select-and-scatter", "reduce-window"), ("reduce", "reduce"),
                ("sort", "sort"), ("dynamic-update-slice", "copy/slice"), ("dynamic-slice", "copy/slice"),
                ("copy", "copy/slice"), ("transpose", "copy/slice"), ("slice", "copy/slice"),
                ("concatenate", "copy/slice"), ("pad", "copy/slice"), ("custom-call", "custom-call"),
                ("all-reduce", "collective"), ("all-gather", "collective"), ("reduce-scatter", "collective"))


def split_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    parser = breakdown_parser(__file__, __doc__, "--keep", "keep the trace and XLA's dump in this folder")
    parser.add_argument("--phase", default="train", choices=list(PHASE_MODULES),
                        help="the train step (default) or the forward pass (benchmark.py's phases)")
    args, rest = parse_breakdown_args(parser, argv, ("--mode", "--profile_dir"), "it profiles the --phase")
    for flag in ("--runs", "--warmup"):
        if not any(a == flag or a.startswith(flag + "=") for a in rest):
            rest += [flag, "1"]
    return args, rest


def run_profiled(benchmark_args: List[str], folder: Path, phase: str = "train") -> dict:
    """Runs benchmark.py's `phase` with the HLO dump, the per-instruction trace events and one profiled call;
    returns its JSON report."""
    report = folder / "benchmark.json"
    env = dict(os.environ)
    dump = f"--xla_dump_to={folder / 'xla_dump'} --xla_dump_hlo_module_re={PHASE_MODULES[phase]}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {dump} {TRACE_FLAG}".strip()
    command = [sys.executable, str(BENCHMARK), *benchmark_args, "--mode", phase,
               "--profile_dir", str(folder / "trace"), "--json", str(report)]
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise BreakdownError(f"benchmark.py stopped with status {result.returncode} (its message is above)")
    return json.loads(report.read_text())


def read_trace(folder: Path, module: str = MODULE) -> List[Tuple[object, float, float, str]]:
    """(thread, start us, duration us, HLO instruction) of every traced instruction of `module` in the Perfetto
    trace that jax.profiler wrote under `folder`."""
    paths = sorted(glob.glob(str(folder / "**" / "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise BreakdownError(f"no perfetto_trace.json.gz under {folder}: jax.profiler wrote no trace")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            out.append(((e.get("pid"), e.get("tid")), float(e["ts"]), float(e.get("dur", 0.0)), args["hlo_op"]))
    if not out:
        raise BreakdownError(f"the trace {paths[-1]} has no event of an HLO instruction of {module} (XLA:CPU "
                             f"writes them only with {TRACE_FLAG})")
    return out


def self_times(events: List[Tuple[object, float, float, str]]) -> Dict[str, float]:
    """Instruction -> summed self time in microseconds: each event's duration less that of the events nested in
    it on the same thread."""
    totals = collections.Counter()
    by_thread = collections.defaultdict(list)
    for thread, start, duration, name in events:
        by_thread[thread].append((start, -duration, name))
    for items in by_thread.values():
        items.sort()
        stack = []   # [end, name, self time so far]
        for start, neg_duration, name in items:
            duration = -neg_duration
            while stack and stack[-1][0] <= start:
                end, done, own = stack.pop()
                totals[done] += own
            if stack:
                stack[-1][2] -= duration
            stack.append([start + duration, name, duration])
        for _, done, own in stack:
            totals[done] += own
    return dict(totals)


def async_tails(events: List[Tuple[object, float, float, str]], instructions: Dict[str, Instruction],
                min_gap_us: float = MIN_ASYNC_GAP_US) -> Tuple[Dict[str, float], float, float]:
    """The traced call's idle stretches (no traced instruction running on any thread), in microseconds. One of at
    least `min_gap_us` goes to the instruction with an opcode in ASYNC_OPCODES that the executor waited for: the
    one, among the operands of the instruction that ends the stretch, started last before it; when that instruction
    has no such operand, the one started last of all. Returns ({instruction: tail}, the shorter stretches (between
    instructions), the long stretches with no such instruction before them)."""
    def is_async(name):
        return instructions.get(name, UNKNOWN).opcode in ASYNC_OPCODES

    tails = collections.Counter()
    between = unattributed = 0.0
    busy_until, last_async, started = None, None, {}
    for _, start, duration, name in sorted(events, key=lambda e: e[1]):
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            if gap < min_gap_us:
                between += gap
            else:
                waited = [o for o in instructions.get(name, UNKNOWN).operands if o in started and is_async(o)]
                owner = max(waited, key=started.get) if waited else last_async
                if owner is not None:
                    tails[owner] += gap
                else:
                    unattributed += gap
        busy_until = start + duration if busy_until is None else max(busy_until, start + duration)
        started[name] = start
        if is_async(name):
            last_async = name
    return dict(tails), between, unattributed


def kernel_kinds(instructions: Dict[str, Instruction]) -> Dict[str, Tuple[str, str]]:
    """Instruction -> (kernel kind, JAX name stack). The kind of a fusion is the heaviest opcode in its fused
    computation. The name stack is the instruction's own or, where XLA's rewrites left it without one (a weight
    gradient's convolution, for one), that of the heaviest fused instruction, else that of the nearest operands
    that have one (up to four steps back)."""
    members = collections.defaultdict(list)
    for i in instructions.values():
        members[i.computation].append((i.opcode, i.op_name))

    def rank(opcode):
        return next((i for i, (op, _) in enumerate(KERNEL_KINDS) if op == opcode), len(KERNEL_KINDS))

    kinds, names = {}, {}
    for name, (opcode, _, op_name, _, _, calls) in instructions.items():
        inside = members.get(calls, []) if opcode == "fusion" else [(opcode, op_name)]
        best = min(range(len(inside)), key=lambda i: (rank(inside[i][0]), not inside[i][1]), default=None)
        r = rank(inside[best][0]) if best is not None else len(KERNEL_KINDS)
        kinds[name] = KERNEL_KINDS[r][1] if r < len(KERNEL_KINDS) else "elementwise"
        if not op_name and inside:
            op_name = next((n for n in ([inside[best][1]] + [n for _, n in inside]) if n), "")
        names[name] = op_name

    def through_operands(name):
        frontier, seen = [name], {name}
        for _ in range(4):
            frontier = [o for n in frontier for o in instructions[n].operands if o not in seen and o in names]
            seen.update(frontier)
            found = [names[o] for o in frontier if names[o] and instructions[o].opcode != "parameter"]
            # An instruction that takes a cotangent is backward work (a weight gradient takes activations too).
            found = [n for n in found if "transpose(" in n] or found
            if found:
                return collections.Counter(found).most_common(1)[0][0]
        return ""

    return {name: (kinds[name], names[name] or through_operands(name)) for name in instructions}


def breakdown(trace_folder: Path, dump_folder: Path, top: int, module: str = MODULE) -> dict:
    """The time breakdown of the traced call of `module` (see the module docstring)."""
    instructions = read_instructions(find_dump_file(dump_folder, ".txt", module).read_text().splitlines())
    kinds = kernel_kinds(instructions)
    events = read_trace(trace_folder, module)
    times = self_times(events)
    tails, between, unattributed = async_tails(events, instructions)
    rows = []
    for name, us in times.items():
        i = instructions.get(name, UNKNOWN)
        kind, op_name = kinds.get(name, ("?", ""))
        tail = tails.get(name, 0.0)
        row = dict(classify(i.opcode, op_name), instruction=name, seconds=(us + tail) / 1e6, async_seconds=tail / 1e6,
                   shape=i.shape, op_name=op_name, kernel=kind)
        row["inner_sub_part"] = row["sub_part"].split("/")[-1]
        rows.append(row)
    total = sum(r["seconds"] for r in rows)

    def table(keys):
        sums, asynchronous = collections.Counter(), collections.Counter()
        for row in rows:
            sums[tuple(row[k] for k in keys)] += row["seconds"]
            asynchronous[tuple(row[k] for k in keys)] += row["async_seconds"]
        return [dict(zip(keys, key), seconds=s, async_seconds=asynchronous[key], share=s / total)
                for key, s in sums.most_common(top)]

    unknown = sum(1 for name in times if name not in instructions)
    return {"traced_seconds": sum(times.values()) / 1e6, "async_seconds": sum(tails.values()) / 1e6,
            "attributed_seconds": total, "between_seconds": between / 1e6,
            "unattributed_seconds": unattributed / 1e6, "instructions": len(rows), "not_in_hlo": unknown,
            "by_part": table(["part"]), "by_part_and_sub_part": table(["part", "sub_part", "pass"]),
            "by_inner_sub_part": table(["inner_sub_part"]), "by_pass": table(["pass"]),
            "by_op": table(["pass", "op"]), "by_kernel": table(["kernel"]),
            "slowest": [dict(r, share=r["seconds"] / total) for r in sorted(rows, key=lambda r: -r["seconds"])[:top]]}


def print_report(result: dict) -> None:
    b = result.get("benchmark") or {}
    wall = b.get("profiled_call_s")
    print(f"traced call: {result['traced_seconds']:.3f} s of instruction self time over {result['instructions']} "
          f"instructions, {result['async_seconds']:.3f} s of convolutions' and dots' work after their launch "
          f"(asynchronous), {result['between_seconds']:.3f} s between instructions and "
          f"{result['unattributed_seconds']:.3f} s of other idle stretches (unattributed)" +
          (f"; the call took {wall:.3f} s" if wall else "") +
          (f" (timed median without the profiler: {b['median_s']:.3f} s)" if b.get("median_s") else "") +
          f". Shares are of the {result['attributed_seconds']:.3f} s attributed.")
    for title, key, names in (("by part", "by_part", ["part"]), ("by pass", "by_pass", ["pass"]),
                              ("by part, sub-part and pass", "by_part_and_sub_part", ["part", "sub_part", "pass"]),
                              ("by innermost sub-part", "by_inner_sub_part", ["inner_sub_part"]),
                              ("by op kind (JAX primitive)", "by_op", ["pass", "op"]),
                              ("by kernel kind (the heaviest operation of each fusion)", "by_kernel", ["kernel"])):
        print(f"\n{title}:")
        print(" | ".join(names + ["s", "of it asynchronous", "share"]))
        for row in result[key]:
            print(" | ".join([str(row[k]) for k in names] + [f"{row['seconds']:.3f}", f"{row['async_seconds']:.3f}",
                                                             f"{row['share']:.1%}"]))
    print("\nslowest instructions:")
    print("s | of it asynchronous | share | kernel | shape | part | sub_part | pass | op | instruction")
    for r in result["slowest"]:
        print(f"{r['seconds']:.3f} | {r['async_seconds']:.3f} | {r['share']:.1%} | {r['kernel']} | {r['shape']} | "
              f"{r['part']} | {r['sub_part']} | {r['pass']} | {r['op']} | {r['instruction']}")


def main(argv=None) -> int:
    args, benchmark_args = split_args(sys.argv[1:] if argv is None else argv)
    module = PHASE_MODULES[args.phase]
    return run_breakdown(
        Path(__file__).name, args.keep, "vrtspike-profile-", args.phase,
        lambda folder: (run_profiled(benchmark_args, folder, args.phase),
                        breakdown(folder / "trace" / args.phase, folder / "xla_dump", args.top, module)),
        lambda measured: {k: measured.get(k) for k in ("compile_s", "median_s", "times_s", "profiled_call_s", "flops")},
        benchmark_args, print_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
