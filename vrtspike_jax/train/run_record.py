"""The run record: what code, config and packages produced a workdir.

Every start of `train_and_evaluate` (first run and each resume) writes, from process 0,
`WORKDIR/run_records/run_<k>_step_<start step>.json` with:
  time (UTC, ISO 8601), argv, hostname, python, platform, jax backend / devices / process count,
  git {revision, branch, dirty, status (porcelain lines)} of the checkout the code was imported from (or
  {"error": ...} when it is not a git checkout), the full config (as resolved, JSON), the installed packages
  (`pip freeze` lines; `importlib.metadata` if pip is unavailable), the start step and the checkpoint resumed from.
Uncommitted changes to tracked files are saved beside it as `run_<k>_step_<start step>.patch` (`git diff HEAD`), so
a dirty tree can be reproduced too.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import jax

from data_pipelines import fileio

RECORD_DIR = "run_records"
_MAX_PATCH_BYTES = 20 * 2 ** 20


def code_root() -> Path:
    """The folder holding the `vrtspike_jax` package (the repository root of a source checkout)."""
    import vrtspike_jax

    return Path(vrtspike_jax.__file__).resolve().parents[1]


def _git(args: List[str], cwd: Path, timeout: float = 30.0) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=True).stdout


def git_info(root: Optional[Path] = None) -> Dict[str, Any]:
    """{revision, branch, dirty, status} of the git checkout at `root`, or {"error": reason}."""
    root = root or code_root()
    try:
        revision = _git(["rev-parse", "HEAD"], root).strip()
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], root).strip()
        status = [line for line in _git(["status", "--porcelain", "--untracked-files=no"], root).splitlines()
                  if line]
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"not a git checkout or git unavailable at {root}: {error}"}
    return {"revision": revision, "branch": branch, "dirty": bool(status), "status": status, "root": str(root)}


def git_diff(root: Optional[Path] = None) -> str:
    """`git diff HEAD` of tracked files ('' when clean or unavailable)."""
    try:
        return _git(["diff", "HEAD", "--no-color"], root or code_root(), timeout=60.0)
    except (OSError, subprocess.SubprocessError):
        return ""


def installed_packages() -> List[str]:
    """`pip freeze` lines; falls back to importlib.metadata (name==version, sorted) when pip cannot run."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        if lines:
            return lines
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    return sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]},
                  key=str.lower)


def write_run_record(workdir, config_dict: Mapping[str, Any], *, start_step: int,
                     resumed_from: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Writes the run record of this start (see the module docstring); returns the JSON path."""
    folder = Path(workdir) / RECORD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob("run_*.json")))
    stem = f"run_{index:03d}_step_{int(start_step):07d}"
    git = git_info()
    record = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "hostname": socket.gethostname(),
        "python": sys.version,
        "platform": platform.platform(),
        "jax": {"version": jax.__version__, "backend": jax.default_backend(), "process_count": jax.process_count(),
                "device_count": jax.device_count(), "local_devices": [str(d) for d in jax.local_devices()],
                "device_kind": jax.devices()[0].device_kind},
        "git": git,
        "start_step": int(start_step),
        "resumed_from": resumed_from,
        "config": dict(config_dict),
        "packages": installed_packages(),
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("XLA_", "JAX_", "TF_CPP", "CUDA_VISIBLE", "TPU_"))},
    }
    if extra:
        record.update(extra)
    if git.get("dirty"):
        diff = git_diff()
        if diff:
            patch = folder / f"{stem}.patch"
            patch.write_text(diff[:_MAX_PATCH_BYTES])
            record["git"]["patch"] = patch.name
    path = folder / f"{stem}.json"
    fileio.atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


__all__ = ["RECORD_DIR", "git_info", "installed_packages", "write_run_record"]
