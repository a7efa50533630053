"""What the command-line scripts share: user errors as one line on stderr (exit status 2), an argparse parser
whose flag errors are one line too, atomic `.npz` outputs.

A user error (a missing or unreadable input, a file of the wrong kind, missing / extra / mis-shaped keys, a bad
option value) is raised as `UsageError` (or a `CheckpointError` / `ValueError` the script turns into one) and
reported by `exit_with_error` as a single line `error: <what, naming the file or value> (<what to do>)`, with no
traceback. Outputs are written under a temporary name beside the target and renamed into place when complete, so
a failed run leaves no partial file behind (and an existing file is untouched).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, NoReturn

import numpy as np

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error of a conversion script: reported as one line on stderr, exit status 2."""


def one_line(text) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def summarize_problems(message: str, limit: int = 6) -> str:
    """One line from a multi-line error (a head line, then one problem per line): at most `limit` problems."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return one_line(message)
    head, problems = lines[0], lines[1:]
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return one_line(f"{head} {shown}" + (f"; ... and {more} more problem(s)" if more > 0 else ""))


def exit_with_error(message) -> NoReturn:
    """Prints `error: message` as one line on stderr and exits with status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line `error: <prog>: <message>` on stderr and exit status 2 (no usage
    block: `--help` shows it)."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{self.prog}: {message} (see --help)")


def require_input_file(path, option: str) -> Path:
    """`path` as a Path; UsageError naming `option` and the path when it is not an existing file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such file (check the path)")
    if not path.is_file():
        raise UsageError(f"{option} {path}: not a file (give the weights file itself)")
    return path


def npz_path(path) -> Path:
    """The file `np.savez(path, ...)` writes: `path`, with `.npz` appended unless it already ends so."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def write_npz_atomically(path, arrays: Mapping[str, np.ndarray], option: str = "--output") -> Path:
    """Writes `arrays` to the `.npz` `np.savez(path)` would write, under a temporary name first; returns the path.

    UsageError (naming `option` and the path) when the folder does not exist or cannot be written; no partial file
    is left behind in any case.
    """
    final = npz_path(path)
    if not final.parent.is_dir():
        raise UsageError(f"{option} {final}: the folder {final.parent} does not exist (create it first)")
    from data_pipelines import fileio

    try:
        with fileio.atomic_path(final) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        raise UsageError(f"{option} {final}: cannot write there ({exc.strerror or exc})") from None
    return final
