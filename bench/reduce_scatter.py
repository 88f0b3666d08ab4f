"""What the TPU compiler makes of FSDP's gradient reduction, slice by slice.

  python3 bench/reduce_scatter.py [--topologies v5e:2x2 v5e:8x8 ...] [--mib 64]

FSDP (`parallel.fsdp`) asks for each gradient to be reduce-scattered into the shards:
`train_step._whole` constrains the cotangent (each device's partial sum) to the leaf's
sharding. Whether the compiled program does that with a reduce-scatter, or with a full
all-reduce that each device then slices (twice the bytes on the links), is the TPU
compiler's choice. This compiles a bare gradient reduction of one float32 leaf of --mib
MiB for each topology (no TPU needed; libtpu from requirements-plan.txt), asked for in
three ways, and prints what the compiler emitted and the bytes each device sends (the
planner's ring estimate, `moby_jax.costs.collectives`) against a reduce-scatter's:

- constraint: partial sums constrained to a 1-D FSDP sharding over every device (what
  the train step does);
- psum_scatter: an explicit `jax.lax.psum_scatter` in a `shard_map`, the same reduction
  written as the collective itself;
- groups of 8: the `data` x `fsdp` mesh of `parallel.fsdp_group=8` (reduce-scatter within
  a group, all-reduce of the shard across groups);
- one psum_scatter per torus axis: on a mesh laid along the slice's torus
  (`mesh_utils.create_device_mesh`), an explicit `psum_scatter` along each axis in turn.
  Only a program that holds each device's partial gradient itself (the backward pass in
  a `shard_map`) can ask for this; the train step is written for the global batch.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import common  # noqa: F401,E402  (import paths)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import mesh_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from moby_jax import costs, parallel, plan  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:16x16",
              "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:4x4", "v6e:16x16")


def _emitted(compiled, n: int) -> tuple[str, float]:
  found, _ = costs.collectives(compiled.as_text(), n)
  kinds = " + ".join(f"{kind} x{c.count}" for kind, c in sorted(found.items()))
  return kinds or "none", sum(c.wire_bytes for c in found.values())


def probe(topology: str, leaf_bytes: int) -> list[tuple[str, str, float, float]]:
  """(way, collectives emitted, bytes sent per device, MiB a reduce-scatter sends)."""
  devices = plan.topology_devices(plan.parse_topology(topology))
  n = len(devices)
  rows = (leaf_bytes // 4 // 256) // n * n
  mib = rows * 256 * 4 / 2 ** 20
  ideal = lambda group: (group - 1) / group * mib
  out = []

  mesh = parallel.make_mesh(devices)
  shard = NamedSharding(mesh, P(parallel.DATA))
  partials = jax.ShapeDtypeStruct((n, rows, 256), jnp.float32, sharding=shard)
  by_constraint = jax.jit(lambda g: jax.lax.with_sharding_constraint(g.sum(0), shard))
  out.append(("constraint", *_emitted(by_constraint.lower(partials).compile(), n), ideal(n)))

  scatter = jax.shard_map(
      lambda g: jax.lax.psum_scatter(g[0], parallel.DATA, scatter_dimension=0, tiled=True),
      mesh=mesh, in_specs=P(parallel.DATA), out_specs=P(parallel.DATA))
  out.append(("psum_scatter",
              *_emitted(jax.jit(scatter).lower(partials).compile(), n), ideal(n)))

  if n > 8:
    mesh2 = parallel.make_mesh(devices, fsdp_group=8)
    both = NamedSharding(mesh2, P((parallel.DATA, parallel.FSDP)))
    within = NamedSharding(mesh2, P(parallel.FSDP))
    partials2 = jax.ShapeDtypeStruct((n, rows, 256), jnp.float32, sharding=both)
    grouped = jax.jit(lambda g: jax.lax.with_sharding_constraint(g.sum(0), within))
    groups = n // 8
    out.append(("groups of 8", *_emitted(grouped.lower(partials2).compile(), n),
                ideal(8) + 2 * (groups - 1) / groups * mib / 8))

  dims = [d for d in plan.parse_topology(topology).dims if d > 1]
  if len(dims) > 1 and int(np.prod(dims)) == n:  # (libtpu: v4 has 2 devices per chip)
    axes = tuple("xyz"[:len(dims)])
    torus = Mesh(mesh_utils.create_device_mesh(dims, devices), axes)

    def per_axis(g):
      g = g[0]
      for axis in axes:
        g = jax.lax.psum_scatter(g, axis, scatter_dimension=0, tiled=True)
      return g

    scatters = jax.shard_map(per_axis, mesh=torus, in_specs=P(axes), out_specs=P(axes))
    partials3 = jax.ShapeDtypeStruct((n, rows, 256), jnp.float32,
                                     sharding=NamedSharding(torus, P(axes)))
    out.append((f"one psum_scatter per torus axis ({' x '.join(map(str, dims))})",
                *_emitted(jax.jit(scatters).lower(partials3).compile(), n), ideal(n)))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topologies", nargs="+", default=TOPOLOGIES)
  parser.add_argument("--mib", type=int, default=64, help="the gradient leaf's size")
  args = parser.parse_args()
  print("| topology | chips | asked as | compiled to | MiB sent per device | "
        "a reduce-scatter's |\n| --- | --- | --- | --- | --- | --- |", flush=True)
  for topology in args.topologies:
    chips = plan.parse_topology(topology).chips
    for way, emitted, sent, ideal in probe(topology, args.mib * 2 ** 20):
      print(f"| {topology} | {chips} | {way} | {emitted} | {sent / 2 ** 20:.1f} | "
            f"{ideal:.1f} |", flush=True)


if __name__ == "__main__":
  main()
