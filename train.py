"""moby_jax entry point: `python train.py --config CONFIG_FILE --workdir DIR`.

Pre-training and linear evaluation are not implemented yet (see the project's open
issues). For now the entry point builds the backbone the config names, initialises it,
runs a forward pass on a generated batch and prints the feature shape, the parameter
count and the throughput: a check that the installation and the config work.
"""

import json
import pathlib
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from moby_jax.models import build_encoder, init_encoder

config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config(arg)).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = flags.FLAGS.config
  workdir = pathlib.Path(flags.FLAGS.workdir)
  model = build_encoder(config.model)
  variables = init_encoder(model, jax.random.key(config.seed))
  n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  batch = jax.random.normal(jax.random.key(config.seed + 1),
                            (config.data.batch_size, *model.image_hw, 3))
  forward = jax.jit(model.apply)
  features = forward(variables, batch).block_until_ready()  # compiles
  start = time.perf_counter()
  features = forward(variables, batch).block_until_ready()
  seconds = time.perf_counter() - start
  summary = dict(model=config.model.name, params=int(n_params),
                 feature_shape=list(features.shape),
                 images_per_second=round(config.data.batch_size / seconds, 1),
                 devices=[str(d) for d in jax.devices()])
  print(f"{config.model.name}: {n_params:,} parameters; features {tuple(features.shape)} "
        f"for a batch of {config.data.batch_size}; {summary['images_per_second']} images/s "
        f"on {jax.devices()[0].platform}")
  assert bool(jnp.all(jnp.isfinite(features))), "non-finite features"
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "forward_check.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
