"""Configs from the command line outside train.py (the converter, the planner)."""

from absl import flags
from ml_collections import config_flags


def load_config(spec: str, overrides: list[str]):
  """The ConfigDict of `spec` ("path.py" or "path.py:arg") with --config.x.y=v overrides,
  loaded and locked as train.py's --config flag loads it. Raises ValueError naming the
  problem (a missing file, an unknown field, an argument that is not --config.*)."""
  argv = ["moby_jax", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  sys_argv=argv, lock_config=True)
  try:
    rest = values(argv)
    config = values.config
    _ = config.model  # a config file that failed to load raises only when used
  except (flags.Error, OSError, AttributeError, KeyError, ValueError) as err:
    raise ValueError(f"config {spec} {' '.join(overrides)}: {type(err).__name__}: {err}") \
        from None
  if len(rest) > 1:
    raise ValueError(f"unrecognised arguments: {' '.join(rest[1:])}")
  return config
