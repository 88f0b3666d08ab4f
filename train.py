"""moby_jax entry point: `python train.py --config CONFIG_FILE[:ARG] --workdir DIR`.

Runs the task the config names: `moby` (self-supervised pre-training) or `linear`
(linear evaluation of a pre-trained encoder). Override any field on the command line,
e.g. `--config.train.epochs=100`; unknown fields are an error (configs are locked).
A run resumes from the latest complete checkpoint in DIR. A SIGTERM at any moment (start-up,
compilation, training, evaluation) stops it cleanly, saving the step it reached, and the
process exits 0; with several processes all of them stop at the same step.
"""

# First, before the slow imports: from here on SIGTERM is a stop request, not a kill, and
# the run's clock (goodput: start-up counts from here) is running.
from moby_jax import goodput, preemption

goodput.process_started()
preemption.install()

import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)); FILE:ARG "
                                "passes ARG, e.g. configs/moby_swin_tiny.py:epochs=100.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (a local "
                    "path or a bucket, e.g. gs://bucket/run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/absl info lines drown the progress
  # After flag parsing, so that --help is fast and jax sees the environment.
  from moby_jax import linear, loop, parallel, pretrain
  config = flags.FLAGS.config
  if config.get("train") and config.train.get("deterministic", False):
    parallel.use_deterministic_ops()  # before anything starts the backend
  parallel.initialize_distributed()
  tasks = {"moby": pretrain.pretrain, "linear": linear.linear_eval}
  task = config.get("task", None)
  if task not in tasks:
    raise app.UsageError(f"config.task must be one of {sorted(tasks)}, got {task!r}")
  try:
    tasks[task](config, flags.FLAGS.workdir)
  except loop.TrainingDiverged as err:
    sys.exit(f"error: {err}")


if __name__ == "__main__":
  app.run(main)
