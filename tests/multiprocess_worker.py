"""One process of a `jax.distributed` run on 127.0.0.1 (used by test_multiprocess.py).

  python multiprocess_worker.py step PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT.npz
  python multiprocess_worker.py program PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES DATA WORKDIR EPOCHS EVAL

`step`: 3 train steps of the golden-fixture model on a global batch of 8 (this process
feeds its own slice); process 0 writes the losses and both queues to OUT.npz.
`program`: the training program (pretrain.pretrain) on the tiny test config of
test_program.py for EPOCHS epochs of the image folder DATA, checkpointing into WORKDIR,
logging only at the last step; with EVAL=1 then the evaluation of eval.enabled (kNN, a
one-epoch linear probe), results.json and the .pth export. It prints its summary as JSON (`summary {...}`) and the
host syncs the step loop made (`syncs {...}`: calls of jax.device_get,
jax.block_until_ready and multihost_utils.process_allgather, by the number of train
steps dispatched before each).
"""

import collections
import json
import os
import pathlib
import sys

mode, pid, nproc, port, ndev = sys.argv[1:6]
pid, nproc, ndev = int(pid), int(nproc), int(ndev)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from moby_jax import preemption  # noqa: E402

preemption.install()  # as train.py does, first thing

import jax  # noqa: E402
import numpy as np  # noqa: E402

import convert  # noqa: E402
import moby_jax  # noqa: E402
from conftest import FIXTURES, noise_robust_config  # noqa: E402
from moby_jax import parallel, pretrain  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc),
                    JAX_PROCESS_ID=str(pid))
parallel.initialize_distributed()
assert jax.device_count() == nproc * ndev


def run_steps(out):
  batch = 8
  config = noise_robust_config(batch_size=batch)
  fx = np.load(FIXTURES / "moby_tiny_swin.npz")
  state = convert.from_pytorch({k[5:]: fx[k] for k in fx.files if k.startswith("init/")},
                               config)
  step = moby_jax.make_train_step(config)
  rng = np.random.default_rng(7)
  local = slice(pid * batch // nproc, (pid + 1) * batch // nproc)
  losses = []
  for _ in range(3):
    views = [rng.normal(size=(batch, 32, 32, 3)).astype(np.float32) for _ in range(2)]
    state, metrics = step(state, {"view1": views[0][local], "view2": views[1][local]})
    losses.append(float(metrics["loss"].addressable_data(0)))
  local_value = lambda x: np.asarray(x.addressable_data(0))
  if pid == 0:
    np.savez(out, losses=np.asarray(losses), queue1=local_value(state.queue1),
             queue2=local_value(state.queue2), queue_ptr=local_value(state.queue_ptr))
  print(f"process {pid}/{nproc}: losses {losses}")


def record_syncs():
  """Counts host syncs by how many train steps were dispatched before each."""
  from jax.experimental import multihost_utils
  from moby_jax import run
  dispatched = [0]
  syncs = collections.Counter()
  make_step = run.Pretraining._make_step

  def counting_make_step(*args, **kwargs):
    step_fn = make_step(*args, **kwargs)

    def counted(state, batch):
      dispatched[0] += 1
      print(f"dispatched {dispatched[0]}", flush=True)
      return step_fn(state, batch)
    counted.jitted = step_fn.jitted  # lowered for the FLOP count (costs.step_flops)
    return counted

  def counting(module, name):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
      syncs[dispatched[0]] += 1
      return original(*args, **kwargs)
    setattr(module, name, wrapper)

  run.Pretraining._make_step = counting_make_step
  counting(jax, "device_get")
  counting(jax, "block_until_ready")
  counting(multihost_utils, "process_allgather")
  return syncs


def run_program(data, workdir, epochs, evaluate):
  from test_program import tiny_config
  config = tiny_config(data, epochs=int(epochs))
  config.train.log_every_steps = 1000  # log at the last step only
  if evaluate == "1":
    config.eval.enabled = True
    config.eval.linear.update(epochs=1, batch_size=8)
  syncs = record_syncs()
  summary = pretrain.pretrain(config, workdir)
  print(f"summary {json.dumps(summary)}", flush=True)
  print(f"syncs {json.dumps(dict(syncs))}", flush=True)


{"step": run_steps, "program": run_program}[mode](*sys.argv[6:])
