r"""Train and evaluate VRT + spike deblurring.

    python main.py --config=configs/baseline.py --workdir=runs/baseline \
        --config.loss.vgg_weights=weights/vgg16_features.npz    # from scripts/convert_vgg_weights.py
    python main.py --config=configs/baseline.py:quick --workdir=runs/quick              # a first try, CPU
    python main.py --config=configs/baseline.py:quick,vrt_only --workdir=runs/quick_vrt
    python main.py --config=configs/baseline.py --workdir=runs/x4k --config.data.root=/data/x4k_ours \
        --config.data.spike_scale=2 --config.loss.vgg_weights=weights/vgg16_features.npz --config.total_steps=100000

Rerunning the same command on the same workdir resumes from its last checkpoint (a larger
--config.total_steps continues training). Multi-host (TPU pods, several GPU hosts): run the same command on
every host with --config.distributed.initialize=True (or VRTSPIKE_DISTRIBUTED=1); see docs/TRAINING.md.

Exit status: 0 done; 1 stopped after `nonfinite.max_consecutive` non-finite steps in a row; 2 a bad command line,
config, data, weights file or checkpoint: one line `error: ...` naming the option or file, its value and what to
do (no traceback; VRTSPIKE_DEBUG=1 shows one), raised before the work it concerns, so a corrected rerun of the
same command starts cleanly.
"""
import logging as pylogging
import os
import sys

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs, metrics and the run record.")
config_flags.DEFINE_config_file("config", None, "Training configuration (a configs/*.py file, ':variant' args).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """Drops INFO lines of Orbax (dozens per checkpoint); its warnings and errors still show."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


EXIT_NONFINITE, EXIT_USER_ERROR = 1, 2


def _debug() -> bool:
    return os.environ.get("VRTSPIKE_DEBUG", "") not in ("", "0")


def _fail(message: str) -> None:
    """One line on stderr and exit status 2 (a traceback only with VRTSPIKE_DEBUG=1).

    The process ends with os._exit: Orbax / tensorstore threads that a failed restore leaves behind would print
    asyncio tracebacks during the interpreter's shutdown, burying the one line that matters.
    """
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    pylogging.shutdown()
    os._exit(EXIT_USER_ERROR)


def parse_flags(argv):
    """absl's flag parsing, with the config file's errors (an unknown --config.KEY, an unknown variant, a value of
    the wrong type) as one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        if _debug():
            raise
        text = str(error)
        if "Traceback (most recent call last)" in text:  # the config file raised: its own message is the last line
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            text = f"{lines[0].split(': Error whilst')[0]}: {lines[-1].split(': ', 1)[-1]}"
        _fail(text)
    except (AttributeError, KeyError, ValueError, TypeError) as error:  # an override of a key the config lacks
        if _debug():
            raise
        _fail(_unknown_override(argv) or f"--config: {' '.join(str(error).split())}")


def _unknown_override(argv) -> str:
    """The message for the first --config.KEY=VALUE of `argv` whose KEY no training config has, or ''."""
    from vrtspike_jax.train import preflight
    from vrtspike_jax.train.defaults import base_config

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        *parents, key = arg[len("--config."):].split("=", 1)[0].split(".")
        try:
            preflight.check_known_keys(_nested(parents, key), base_config())
        except preflight.ConfigError as error:
            return f"{arg}: {error}"
    return ""


def _nested(parents, key):
    tree = {key: None}
    for name in reversed(parents):
        tree = {name: tree}
    return tree


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Imported here so that --help is fast and jax.distributed.initialize runs before any backend use.
    from vrtspike_jax.train import preflight, train_lib

    try:   # train_and_evaluate runs the start-up checks first, then jax.distributed.initialize
        summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train_lib.NonFiniteLossError as error:
        logging.error("%s", error)
        print(f"stopped: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE)
    except preflight.user_errors() as error:
        if _debug():
            raise
        _fail(str(error))
    import jax

    if jax.process_index() == 0:
        print(train_lib.format_summary(summary), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
