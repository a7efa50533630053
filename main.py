r"""Train and evaluate VRT + spike deblurring.

    python main.py --config=configs/baseline.py --workdir=runs/baseline
    python main.py --config=configs/baseline.py:quick --workdir=runs/quick              # a first try, CPU
    python main.py --config=configs/baseline.py:quick,vrt_only --workdir=runs/quick_vrt
    python main.py --config=configs/baseline.py --workdir=runs/x4k --config.data.root=/data/x4k_ours \
        --config.loss.vgg_weights=/weights/vgg16.npz --config.total_steps=100000

Rerunning the same command on the same workdir resumes from its last checkpoint (a larger
--config.total_steps continues training). Multi-host (TPU pods, several GPU hosts): run the same command on
every host with --config.distributed.initialize=True (or VRTSPIKE_DISTRIBUTED=1); see docs/TRAINING.md.
"""
import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs, metrics and the run record.")
config_flags.DEFINE_config_file("config", None, "Training configuration (a configs/*.py file, ':variant' args).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """Drops INFO lines of Orbax (dozens per checkpoint); its warnings and errors still show."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Imported here so that --help is fast and jax.distributed.initialize runs before any backend use.
    from vrtspike_jax.train import train_lib

    train_lib.maybe_initialize_distributed(FLAGS.config)
    try:
        summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train_lib.NonFiniteLossError as error:
        logging.error("%s", error)
        raise SystemExit(f"stopped: {error}")
    import jax

    if jax.process_index() == 0:
        print(train_lib.format_summary(summary), flush=True)


if __name__ == "__main__":
    app.run(main)
