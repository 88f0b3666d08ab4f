"""The `meta` entry of an exported file: plain Python types saying what the file holds
(format, encoder architecture, config, step, source, branch, head, version)."""

import json
from typing import Any

import jax.numpy as jnp

import moby_jax
from convert.names import FORMATS, family


def _plain(value):
  """JSON types only (tuples -> lists, other objects -> str)."""
  return json.loads(json.dumps(value, default=str))


def architecture(model, variant: str | None) -> dict[str, Any]:
  """The encoder's resolved fields (what `build_encoder` needs), plain types."""
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__
            if f not in ("parent", "name", "dtype")}
  return _plain({"variant": variant, "family": family(model), **fields,
                 "dtype": jnp.dtype(model.dtype).name})


def make_meta(fmt: str, model, config, step: int, source: str, branch: str,
              num_classes: int) -> dict[str, Any]:
  """The `meta` entry of an export (plain Python types); `source`: where the state came
  from (e.g. a workdir), free text."""
  return _plain({
      "format": fmt, "content": FORMATS[fmt].summary,
      "architecture": architecture(model, config.model.get("name")),
      "config": json.loads(config.to_json_best_effort()),
      "step": int(step), "source": source,
      "branch": branch if fmt != "official" else "online and target",
      "head": f"{num_classes} classes, zero-initialised" if num_classes else None,
      "moby_jax_version": moby_jax.__version__, "written_by": "convert.to_pytorch",
  })

