#!/usr/bin/env bash
# The prepared GPU measurement of issue 13 (docs/PERFORMANCE.md section "GPU"): the bf16 train step of
# configs/baseline.py (VRT + spike branch, the step training runs) at 1x6x192x192 and 1x5x256x256 through
# scripts/benchmark.py (compile time, median step time, MFU, XLA's temporaries, peak device memory), plain VRT
# (`:vrt_only`) at 1x6x192x192, the network a PyTorch harness times, and the official PyTorch VRT's train step at the
# same two shapes when torch imports and VRT_TORCH_HARNESS names a harness script; in the order of STEPS below.
#
#   scripts/gpu_benchmark.sh [--dry_run] [OUTPUT_DIR]     # OUTPUT_DIR: else $OUT, else ./gpu_bench
#   DRY_RUN=1 scripts/gpu_benchmark.sh                     # the same as --dry_run
#   VRT_TORCH_HARNESS=/path/to/vrt_torch_harness.py scripts/gpu_benchmark.sh
#
# The whole script stays under 8 minutes on one H100/H200: every step runs under `timeout` and no step outlives the
# script's budget of BUDGET_S seconds (a step that would is cut to what is left, or not started when under
# MIN_STEP_S is left). A failed, timed-out or unstarted step is reported and the script goes on to the next one; the
# exit status is 1 when any step failed, 2 for a bad command line, else 0.
#
# --dry_run prints the commands without running them (it only tries `import torch`, which decides whether the
# PyTorch commands are printed) and creates nothing.
#
# The PyTorch harness is the user's own script around the official VRT code (models/network_vrt.py of
# JingyunLiang/VRT, which cannot be committed here). It is run as
#   python3 "$VRT_TORCH_HARNESS" --frames T --height H --width W --json OUTPUT_DIR/torch_train_TxHxW.json
# and should time the official deblurring VRT's train step (forward, Charbonnier loss, backward, AdamW) on this card
# at batch 1 and write its numbers (and its own settings: precision, checkpointing) to that JSON file.
#
# Environment: PYTHON (default python3), used for every Python command. The repository goes first on PYTHONPATH,
# so the package needs no install; jax, flax, optax, orbax-checkpoint and ml_collections must import (on a GPU
# machine without ml_collections, install its wheel: docs/PERFORMANCE.md section "GPU").
set -euo pipefail

readonly BUDGET_S=460        # the whole script; with the 5 s kill grace of the last step it ends before 8 minutes
readonly INFO_TIMEOUT_S=30   # each version probe
readonly MIN_STEP_S=15       # a step is not started with less than this left
readonly KILL_AFTER_S=5
readonly RUNS=3
readonly WARMUP=1
# The measurements in order: kind (torch: the harness; jax: benchmark.py's bf16 train step), config (jax), frames,
# height, width, the step's own time limit in seconds. On an H200 (2026-11-30) the PyTorch VRT's step took 1-1.4 s
# after a first step of 14-19 s (cudnn.benchmark), while benchmark.py's plain-VRT step at 1x6x192x192 took 286 s to
# compile (21 s tracing and lowering, then XLA: 214 s of HLO passes, about 90 s of them autotuning, and 37 s of code
# generation; docs/PERFORMANCE.md "GPU") and the baseline's did not compile within 230 s. So plain VRT, the network
# the PyTorch harness times, comes right after the PyTorch step of that shape and may use most of the budget; the
# baseline follows if time is left. XLA_FLAGS from the environment reach every JAX step (for instance
# --xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false: 171 s instead of 265 s of XLA compile, untuned
# kernels).
readonly STEPS=(
  "torch - 6 192 192 60"
  "jax configs/baseline.py:vrt_only 6 192 192 390"
  "jax configs/baseline.py 6 192 192 300"
  "jax configs/baseline.py 5 256 256 300"
  "torch - 5 256 256 40"
)

usage="usage: scripts/gpu_benchmark.sh [--dry_run] [OUTPUT_DIR]"
dry_run="${DRY_RUN:-0}"
out_dir=""
for arg in "$@"; do
  case "$arg" in
    --dry_run) dry_run=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "error: gpu_benchmark.sh: unknown option $arg ($usage)" >&2; exit 2 ;;
    *)
      if [[ -n "$out_dir" ]]; then
        echo "error: gpu_benchmark.sh: one OUTPUT_DIR expected, got $out_dir and $arg ($usage)" >&2
        exit 2
      fi
      out_dir="$arg" ;;
  esac
done
if [[ "$dry_run" != 0 && "$dry_run" != 1 ]]; then
  echo "error: gpu_benchmark.sh: DRY_RUN=$dry_run: expected 0 or 1" >&2
  exit 2
fi
out_dir="${out_dir:-${OUT:-./gpu_bench}}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + BUDGET_S))
failed=()

if [[ "$dry_run" == 0 ]]; then
  mkdir -p "$out_dir"
  exec > >(tee -a "$out_dir/gpu_benchmark.log") 2>&1
fi

# run_step NAME TIMEOUT_S COMMAND...: prints the command; runs it under timeout (cut to the budget left) unless this is
# a dry run; records a failure (exit status, time-out, no time left) and returns 0 so that the next step runs.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((deadline - SECONDS))
  if ((limit > left)); then
    limit=$left
  fi
  local cmd
  cmd="timeout --kill-after=${KILL_AFTER_S} ${limit} $(printf '%q ' "$@")"
  if [[ "$dry_run" == 1 ]]; then
    echo "dry run: ${cmd% }"
    return 0
  fi
  if ((limit < MIN_STEP_S)); then
    echo "FAILED $name: not started, ${left} s left of the ${BUDGET_S} s budget"
    failed+=("$name (not started: no time left)")
    return 0
  fi
  echo "=== $name ($(date '+%H:%M:%S'), at most ${limit} s)"
  echo "+ ${cmd% }"
  local start=$SECONDS rc=0
  timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "FAILED $name: timed out after ${limit} s"
    failed+=("$name (timed out after ${limit} s)")
  elif ((rc != 0)); then
    echo "FAILED $name: exit status $rc"
    failed+=("$name (exit status $rc)")
  else
    echo "done $name in $((SECONDS - start)) s"
  fi
  return 0
}

# ---- the card, the versions, the imports the benchmark needs
imports_ok=1
if [[ "$dry_run" == 1 ]]; then
  echo "dry run: nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; the versions of python, jax," \
       "jaxlib, flax, optax, numpy (and torch); outputs into $out_dir"
else
  echo "gpu_benchmark.sh: $(date '+%Y-%m-%d %H:%M:%S'), host $(hostname), outputs in $out_dir"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (not a git checkout)')"
  timeout --kill-after="$KILL_AFTER_S" "$INFO_TIMEOUT_S" nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv || echo "nvidia-smi: not available (exit status $?)"
  if ! timeout --kill-after="$KILL_AFTER_S" "$INFO_TIMEOUT_S" "$python" -c '
import platform, jax, jaxlib, flax, optax, numpy, orbax.checkpoint, ml_collections, vrtspike_jax
print("python", platform.python_version(), "| jax", jax.__version__, "| jaxlib", jaxlib.__version__, "| flax",
      flax.__version__, "| optax", optax.__version__, "| numpy", numpy.__version__)'; then
    echo "error: $python cannot import what scripts/benchmark.py needs (jax, flax, optax, numpy, orbax-checkpoint," \
         "ml_collections, vrtspike_jax: see the line above); the JAX measurements are not run"
    imports_ok=0
  fi
fi

# ---- PyTorch: decided here, so that every probe lies inside the budget (the harness runs first)
harness="${VRT_TORCH_HARNESS:-}"
torch_run=0
if [[ -z "$harness" ]]; then
  echo "PyTorch comparison skipped: VRT_TORCH_HARNESS is not set (a harness script of your own around the official" \
       "VRT code; see the head of scripts/gpu_benchmark.sh)"
elif [[ ! -f "$harness" ]]; then
  echo "FAILED torch: VRT_TORCH_HARNESS=$harness is not a file"
  failed+=("torch (VRT_TORCH_HARNESS=$harness is not a file)")
elif ! torch_probe="$(timeout --kill-after="$KILL_AFTER_S" "$INFO_TIMEOUT_S" "$python" -c '
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1)"; then
  echo "PyTorch comparison skipped: $python cannot import torch ($(tail -n 1 <<<"$torch_probe"))"
else
  echo "$torch_probe"
  torch_run=1
fi

# ---- the measurements, in the order of STEPS: each gets at most its own limit and no more than the budget left
for step in "${STEPS[@]}"; do
  read -r kind config frames height width limit <<<"$step"
  shape="${frames}x${height}x${width}"
  if [[ "$kind" == torch ]]; then
    [[ "$torch_run" == 1 ]] || continue
    name="torch_train_${shape}"
    run_step "$name" "$limit" "$python" "$harness" --frames "$frames" --height "$height" --width "$width" \
      --json "$out_dir/$name.json"
    continue
  fi
  variant="${config#*:}"
  [[ "$variant" == "$config" ]] && variant="" || variant="${variant}_"
  name="jax_${variant}train_${shape}"
  if [[ "$imports_ok" == 0 ]]; then
    failed+=("$name (not started: imports failed)")
    continue
  fi
  run_step "$name" "$limit" "$python" scripts/benchmark.py --config "$config" --batch 1 \
    --frames "$frames" --height "$height" --width "$width" --dtype bfloat16 --mode train \
    --runs "$RUNS" --warmup "$WARMUP" --json "$out_dir/$name.json"
done

if [[ "$dry_run" == 0 ]]; then
  echo "=== gpu_benchmark.sh finished after $SECONDS s; JSON files in $out_dir"
fi
if ((${#failed[@]} > 0)); then
  summary="$(printf '%s; ' "${failed[@]}")"
  echo "FAILED ${#failed[@]} step(s): ${summary%; }"
  exit 1
fi
if [[ "$dry_run" == 0 ]]; then
  echo "all measurements ran"
fi
