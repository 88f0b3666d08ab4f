"""Quick start: a tiny Swin that runs in seconds on a CPU.

Usage: python train.py --config configs/quickstart.py --workdir /tmp/moby_quickstart
Override any field, e.g. --config.model.name=deit_mu.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      name="swin_mu",          # a registry name: swin_{mu,tiny,small,base,large}, deit_{mu,tiny,small,base}
      img_size=32,
      window_size=4,
      drop_path_rate=0.0,
      dtype="float32",
  ))
  config.data = ml_collections.ConfigDict(dict(batch_size=8))
  config.seed = 0
  return config
