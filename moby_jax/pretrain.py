"""MoBY pre-training, the program train.py runs for config.task == "moby".

`pretrain(config, workdir)` is a plain function (tests call it with tiny configs): it
checks the config and the data before compiling anything, resumes from the latest
complete checkpoint in the workdir, saves every `train.checkpoint_every_steps` steps and
at the end, and on SIGTERM saves at the next step and returns (train.py then exits 0).
With eval.enabled it then evaluates the encoder (kNN and the linear probe of
`moby_jax.linear`) and exports the `.pth`. A finished run writes results.json, with where
its time went over all its starts (moby_jax.goodput). Log lines carry MFU (the step's
FLOPs from costs.step_flops, the planner's count) and memory (moby_jax.monitor).
"""

import json
import time

import jax
import numpy as np

from moby_jax import checkpoint, costs, evaluate, files, goodput, linear, monitor, optim, \
    parallel, preemption
from moby_jax import run as run_lib
from moby_jax.data import loader as loaders
from moby_jax.data import sources
from moby_jax.data.sources import build_source
from moby_jax.logger import MetricLogger
from moby_jax.loop import BadFiles, end_session, eval_batch, is_main, name_unreadable, \
    run_loop, say, stop_summary, sync_num_examples
from moby_jax.run import Pretraining


def pretrain(config, workdir, mesh=None) -> dict:
  """MoBY pre-training (config.task == "moby") on `mesh` (default: all devices); returns
  a summary dict (`preempted` True when a SIGTERM stopped it: the next call resumes).

  With eval.enabled, evaluates the pre-trained online encoder and the same encoder at
  initialisation (kNN and linear probe) and exports it as WORKDIR/moby_official.pth.
  A finished run writes WORKDIR/results.json (the goodput summary, and the evaluation).
  """
  with preemption.handling():
    return _pretrain(config, workdir, mesh)


def _pretrain(config, workdir, mesh) -> dict:
  clock = goodput.Clock()  # from the process start when train.py marked it
  started = time.perf_counter()
  if stopped := stop_summary("start-up"):
    return stopped
  workdir = files.path(workdir)
  mesh = parallel.mesh_for(config) if mesh is None else mesh
  # Everything that can be wrong with the config or the data fails here, before compiling.
  parallel.check_deterministic(config)
  loaders.check_config(config.data)
  source = build_source(config.data, "train")
  val_source = build_source(config.data, "val") if _needs_val(config) else None
  sync_num_examples(config, source)
  run = Pretraining(config, mesh)  # checks the config; compiles nothing yet
  profiler = monitor.Profiler(config, workdir, say, clock)
  checkpoint.save_config(workdir, config)

  total = optim.total_steps(config)
  say(f"MoBY pre-training: {config.model.name} at {config.model.img_size}px, "
      f"{len(source)} images, global batch {config.data.batch_size}, "
      f"{config.train.epochs} epochs = {total} steps, {mesh.size} device(s), "
      f"{jax.process_count()} process(es); workdir {workdir}")
  if run.fsdp_left_whole:
    say(parallel.describe_left_whole(run.fsdp_left_whole, mesh))
  ckpt = checkpoint.Checkpointer(workdir, config, config.train.checkpoint_every_steps,
                                 config.train.keep_checkpoints)
  loader = loaders.pretrain_loader(config, source)
  restored = ckpt.restore(run.abstract_state)
  initial_encoder = None
  if restored is None:
    state = initial_state(run)
    if config.eval.enabled:  # kept on the host for the final comparison
      initial_encoder = jax.device_get(state.encoder())
  else:
    state, data_state, step = restored
    loader.set_state(data_state)
    say(f"resumed from {workdir / checkpoint.CHECKPOINTS / str(step)} (step {step})")
  logger = MetricLogger(workdir, total, config.train.steps_per_epoch,
                        config.data.batch_size, unit="pairs", clock=clock,
                        flops_per_device_step=costs.step_flops(config) / mesh.size,
                        peak_tflops=peak_tflops(config))
  session = goodput.Session(clock, workdir, is_main())
  bad_files = BadFiles(source)

  knn_monitor = None if val_source is None else KnnMonitor(config, mesh, source, val_source)

  def monitor_knn(state, epoch):
    """The kNN monitor, every eval.knn_every_epochs epochs and after the last."""
    if epoch % config.eval.knn_every_epochs == 0 or epoch == config.train.epochs:
      result = knn_monitor(state.encoder())
      logger.scalars(epoch * config.train.steps_per_epoch, {"knn_top1": result["top1"]})
      say(f"epoch {epoch}: kNN top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")

  state, preempted = run_loop(config=config, mesh=mesh, loader=loader, state=state,
                              step_fn=run.step, ckpt=ckpt, logger=logger, bad_files=bad_files,
                              unit_metrics=("view1", "view2"),
                              on_epoch_end=monitor_knn if config.eval.knn_every_epochs else None,
                              session=session, profiler=profiler)
  with clock.part("checkpoint"):
    ckpt.close()
  summary = dict(step=int(jax.device_get(state.step)), preempted=preempted,
                 skipped_files=bad_files.count,
                 skipped_steps=int(jax.device_get(state.skipped_steps)))
  results = {}
  if not preempted and config.eval.enabled:
    clock.set_base("evaluation")
    results = _evaluate(config, run, state, initial_encoder, knn_monitor,
                        (source, val_source), workdir, clock)
    summary["preempted"] = results is None
  times = end_session(session, logger, summary["step"], finished=not summary["preempted"])
  logger.close()
  if summary["preempted"]:
    return summary
  results = dict(pretrain_steps=summary["step"], **(results or {}),
                 skipped_files=bad_files.count, goodput=times,
                 seconds=round(time.perf_counter() - started, 1))
  if is_main():
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  if config.eval.enabled:
    say(json.dumps(results, indent=2))
  return {**summary, **results}


def _evaluate(config, run, state, initial_encoder, knn_monitor, sources, workdir,
              clock) -> dict | None:
  """eval.enabled after pre-training: kNN and linear probe of the pre-trained encoder and
  of the encoder at initialisation, and the .pth export; None when a stop was requested
  (the next start resumes at the end and evaluates)."""
  if stop_summary("the final evaluation"):
    return None
  mesh, (train_source, val_source) = run.mesh, sources
  if initial_encoder is None:  # resumed: the initialisation is a function of the seed
    initial_encoder = initial_state(run).encoder()
  probe_config = run_lib.probe_config(config, train_source.num_classes)
  probe_fns = (evaluate.make_linear_step(probe_config, mesh),
               evaluate.make_linear_eval(probe_config, mesh))
  results, unreadable = {}, set()
  for suffix, variables in (("", state.encoder()), ("_init", initial_encoder)):
    what = "pre-trained" if not suffix else "initial"
    if stop_summary(f"evaluating the {what} encoder"):
      return None
    knn = knn_monitor(variables)
    unreadable.update(knn["unreadable"])
    results[f"knn_top1{suffix}"], results[f"knn_top5{suffix}"] = knn["top1"], knn["top5"]
    say(f"kNN ({what} encoder): top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%")
    probe = linear.linear_run(probe_config, variables, mesh, train_source, val_source,
                              workdir / f"linear{suffix or '_pretrained'}", probe_fns)
    if probe["preempted"]:
      return None
    results[f"linear_top1{suffix}"], results[f"linear_top5{suffix}"] = (
        probe["top1"], probe["top5"])
    unreadable.update(probe["unreadable_val"])
    say(f"linear probe ({what} encoder): top-1 {probe['top1']:.2f}%, "
        f"top-5 {probe['top5']:.2f}%")
  with clock.part("checkpoint"):
    results["pth"] = str(_export(state, config, mesh, workdir))
  # Evaluation leaves unreadable examples out of every metric (never substitutes them).
  results["val_examples"] = knn["val_examples"]
  results["unreadable_eval_files"] = sorted(unreadable)
  return results


def peak_tflops(config) -> float | None:
  """The peak TFLOP/s of one device for MFU: train.peak_tflops when set, else the table's
  (costs.PEAKS) for the devices' kind and model.dtype; None (said once) when unknown."""
  if config.train.peak_tflops:
    return float(config.train.peak_tflops)
  kind = jax.devices()[0].device_kind
  peak = costs.peak_tflops(kind, config.model.dtype)
  if peak is None:
    say(f"MFU: the peak rate of {kind!r} devices is not known, so MFU is not logged "
        "(TFLOP/s per device is); set --config.train.peak_tflops (per device) to log it")
  return peak


def initial_state(run: Pretraining):
  """A fresh train state from train.seed, with both encoders (online and target) read from
  moby.init_from when it names a checkpoint (any format convert reads; an official MoBY
  file gives the whole state)."""
  config = run.config
  if not config.moby.init_from:
    return run.init_state(jax.random.key(config.train.seed))
  import convert
  say(f"initialising from {config.moby.init_from}")
  return convert.from_pytorch(files.path(config.moby.init_from), config, mesh=run.mesh)


def _needs_val(config) -> bool:
  return bool(config.eval.enabled or config.eval.knn_every_epochs)


def _export(state, config, mesh, workdir):
  """The state in the official MoBY format (SPEC §5), for PyTorch: WORKDIR/moby_official.pth,
  written from memory and self-checked (convert.save) by process 0. Every process takes
  part in gathering the state when it is sharded."""
  import convert
  path = workdir / "moby_official.pth"
  state = parallel.replicate(state.replace(opt_state=None), mesh)
  if is_main():
    convert.save(state, config, path, "official", source=str(workdir), force=True)
  return path


class KnnMonitor:
  """kNN accuracy (eval.knn_k, eval.knn_temperature) of an encoder: features of the train
  split (or eval.knn_max_train_examples of it, drawn once by train.seed) and of the val
  split with the eval transform, cosine similarity, weighted votes. Features are
  streamed: memory grows with the number of features, not with the images. Examples
  that cannot be decoded are left out (named in the log and in the result)."""

  def __init__(self, config, mesh, train_source, val_source):
    self.config, self.mesh = config, mesh
    bank = sources.subsample(train_source, config.eval.knn_max_train_examples,
                             config.train.seed)
    if bank is not train_source:
      say(f"kNN: a bank of {len(bank)} of the {len(train_source)} training images "
          "(eval.knn_max_train_examples)")
    self.sources = (bank, val_source)
    self.feature_fn = evaluate.make_feature_fn(config, mesh)

  def _features(self, variables, source) -> tuple[np.ndarray, np.ndarray, set[int]]:
    with loaders.eval_loader(self.config, source,
                             batch_size=eval_batch(self.config, self.mesh)) as batches:
      return evaluate.labelled_features(self.feature_fn, variables, batches)

  def __call__(self, variables) -> dict:
    """{"top1", "top5" (percent), "val_examples", "bank_examples", "unreadable": names}."""
    (train_x, train_y, train_bad), (val_x, val_y, val_bad) = (
        self._features(variables, s) for s in self.sources)
    result = evaluate.knn_classify(train_x, train_y, val_x, val_y,
                                   self.sources[0].num_classes, k=self.config.eval.knn_k,
                                   temperature=self.config.eval.knn_temperature)
    unreadable = (name_unreadable(self.sources[0], train_bad, "kNN bank")
                  + name_unreadable(self.sources[1], val_bad, "kNN val"))
    return {**result, "val_examples": len(val_y), "bank_examples": len(train_y),
            "unreadable": unreadable}
