"""The programs train.py runs: MoBY pre-training and linear evaluation, with resume.

`pretrain(config, workdir)` and `linear_eval(config, workdir)` are plain functions (tests
call them with tiny configs). Both check the config and the data before compiling
anything, resume from the latest complete checkpoint in the workdir, save every
`train.checkpoint_every_steps` steps and at the end, and on SIGTERM save at the next step
and return (train.py then exits 0).
"""

import collections
import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moby_jax import checkpoint, evaluate, files, moby, optim, parallel, preemption, train_step
from moby_jax.data import loader as loaders
from moby_jax.data import sources
from moby_jax.data.sources import build_source
from moby_jax.logger import MetricLogger
from moby_jax.models import build_encoder


def _main() -> bool:
  return jax.process_index() == 0


def say(message: str) -> None:
  if _main():
    print(message, flush=True)


def _sync_num_examples(config, source) -> None:
  """data.num_train_examples (and with it the default steps_per_epoch) follows the data."""
  n = len(source)
  if config.data.num_train_examples != n:
    say(f"data: the training split has {n} examples (data.num_train_examples was "
        f"{config.data.num_train_examples}); using {n}")
    with config.unlocked():
      config.data.num_train_examples = n


class _BadFiles:
  """Training files that could not be read, over all processes: those left out when the
  source was listed, plus those that failed to decode (by source index). Each is named
  once in the log; the count is the `skipped_files` metric."""

  def __init__(self, source):
    self.source = source
    self.indices: set[int] = set()
    self._new: set[int] = set()
    for entry in source.skipped:
      say(f"data: skipped {entry}")

  def add(self, bad: np.ndarray) -> None:
    """Notes this process's unreadable indices of a batch (-1: none)."""
    self._new.update(int(i) for i in np.asarray(bad).ravel() if i >= 0)

  def sync(self) -> int:
    """Shares what every process met since the last call (a collective: every process
    calls it at the same step) and returns the global count."""
    new = parallel.union_over_processes(self._new - self.indices) - self.indices
    self._new.clear()
    for index in sorted(new):
      say(f"data: skipped unreadable example {self.source.name(index)}")
    self.indices |= new
    return self.count

  @property
  def count(self) -> int:
    return len(self.source.skipped) + len(self.indices)


def _unreadable(source, indices, what: str) -> list[str]:
  """Logs and returns the names of evaluation examples that could not be decoded (they
  are left out of the metric, never replaced)."""
  names = [source.name(i) for i in sorted(indices)]
  for name in names:
    say(f"{what}: left out unreadable example {name}")
  return names


class TrainingDiverged(RuntimeError):
  """train.max_consecutive_skipped_steps steps in a row had a non-finite loss or gradient."""


def _run_loop(*, config, mesh, loader, state, step_fn, ckpt, logger, bad_files, unit_metrics,
              on_epoch_end=None, progress=None) -> tuple:
  """Steps until train.epochs are done or a stop is requested; returns (state, preempted).

  `on_epoch_end(state, epoch)` runs after the last step of each epoch; `progress()` gives
  JSON-able run state saved with every checkpoint next to the data position (restored
  with it).

  Nothing here waits for the devices except at log steps (metrics are fetched then) and
  checkpoint steps: the stop check is local (preemption.requested), so the host keeps
  dispatching ahead of the running step, and the next data.device_prefetch batches are
  already on their way to the devices while a step runs.
  """
  total = optim.total_steps(config)
  steps_per_epoch = config.train.steps_per_epoch
  first = step = int(jax.device_get(state.step))
  limit = config.train.max_consecutive_skipped_steps
  # Steps skipped in a row, counted on the device (no host sync per step).
  consecutive = jax.device_put(np.int32(0), parallel.replicated(mesh))
  preempted = False
  # Batches taken from the loader and placed on the devices (asynchronously) before their
  # step: (unreadable indices, global batch, seconds waited for it).
  ahead = collections.deque()
  depth = max(1, config.data.device_prefetch)

  def position() -> dict:
    """Where the next start continues: the batches fetched ahead are not consumed yet."""
    return {**loader.get_state(rewind=len(ahead)), **(progress() if progress else {})}

  def fetch() -> None:
    start = time.perf_counter()
    batch = next(loader)
    waited = time.perf_counter() - start
    bad = batch.pop("bad")
    ahead.append((bad, parallel.to_global({k: batch[k] for k in unit_metrics}, mesh), waited))

  try:
    while step < total:
      if preemption.requested():
        if step > first:
          say(f"stop requested (SIGTERM): saving step {step} and exiting")
          ckpt.save(step, state, position(), force=True)
        else:
          say(f"stop requested (SIGTERM) before the first step: exiting at step {step}")
        preempted = True
        break
      while len(ahead) < min(depth, total - step):
        fetch()
      bad, batch, waited = ahead.popleft()
      bad_files.add(bad)
      state, metrics = step_fn(state, batch)
      consecutive = _count_skipped(consecutive, metrics["skipped"])
      step += 1
      logger.record_step(waited)
      if step % config.train.log_every_steps == 0 or step == total:
        metrics, in_a_row = jax.device_get((metrics, consecutive))
        metrics["skipped_files"] = bad_files.sync()
        logger.log(step, metrics)
        if limit and in_a_row >= limit:
          ckpt.save(step, state, position(), force=True)
          raise TrainingDiverged(
              f"the last {int(in_a_row)} steps (up to step {step}) had a non-finite loss or "
              f"gradient and were skipped (train.max_consecutive_skipped_steps={limit}); "
              f"step {step} is saved: lower the learning rate or check the data")
      if on_epoch_end is not None and step % steps_per_epoch == 0:
        on_epoch_end(state, step // steps_per_epoch)
      ckpt.save(step, state, position())
    if not preempted:
      ckpt.save(step, state, position(), force=True)
    bad_files.sync()
  finally:
    loader.close()
    ckpt.wait()
  return state, preempted


@jax.jit
def _count_skipped(consecutive, skipped):
  return jnp.where(skipped > 0, consecutive + 1, 0).astype(jnp.int32)


def pretrain(config, workdir, mesh=None) -> dict:
  """MoBY pre-training (config.task == "moby") on `mesh` (default: all devices); returns
  a summary dict (`preempted` True when a SIGTERM stopped it: the next call resumes).

  With eval.enabled, evaluates the pre-trained online encoder and the same encoder at
  initialisation (kNN and linear probe), exports it as WORKDIR/moby_official.pth and
  writes WORKDIR/results.json.
  """
  with preemption.handling():
    return _pretrain(config, workdir, mesh)


def _stopped(what: str) -> dict | None:
  """A summary for a stop requested before `what` (None: go on)."""
  if not preemption.requested():
    return None
  say(f"stop requested (SIGTERM) before {what}: exiting")
  return {"preempted": True}


def _pretrain(config, workdir, mesh) -> dict:
  started = time.perf_counter()
  if stopped := _stopped("start-up"):
    return stopped
  workdir = files.path(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  # Everything that can be wrong with the config or the data fails here, before compiling.
  parallel.check_deterministic(config)
  loaders.check_config(config.data)
  source = build_source(config.data, "train")
  val_source = build_source(config.data, "val") if _needs_val(config) else None
  _sync_num_examples(config, source)
  train_step.check_config(config, mesh.size)
  moby.build_branches(config)
  if config.eval.enabled:
    _check_probe(config, mesh)
  checkpoint.save_config(workdir, config)

  total = optim.total_steps(config)
  say(f"MoBY pre-training: {config.model.name} at {config.model.img_size}px, "
      f"{len(source)} images, global batch {config.data.batch_size}, "
      f"{config.train.epochs} epochs = {total} steps, {mesh.size} device(s), "
      f"{jax.process_count()} process(es); workdir {workdir}")
  ckpt = checkpoint.Checkpointer(workdir, config, config.train.checkpoint_every_steps,
                                 config.train.keep_checkpoints)
  loader = loaders.pretrain_loader(config, source)
  restored = ckpt.restore(checkpoint.abstract_target(config, mesh))
  initial_encoder = None
  if restored is None:
    state = _initial_state(config, mesh)
    if config.eval.enabled:  # kept on the host for the final comparison
      initial_encoder = jax.device_get(state.encoder())
  else:
    state, data_state, step = restored
    loader.set_state(data_state)
    say(f"resumed from {workdir / checkpoint.CHECKPOINTS / str(step)} (step {step})")
  step_fn = train_step.make_train_step(config, mesh)
  logger = MetricLogger(workdir, total, config.train.steps_per_epoch,
                        config.data.batch_size, unit="pairs")
  bad_files = _BadFiles(source)

  knn_monitor = None if val_source is None else KnnMonitor(config, mesh, source, val_source)
  monitor = None
  if config.eval.knn_every_epochs:

    def monitor(state, epoch):
      if epoch % config.eval.knn_every_epochs == 0 or epoch == config.train.epochs:
        result = knn_monitor(state.encoder())
        logger.scalars(epoch * config.train.steps_per_epoch, {"knn_top1": result["top1"]})
        say(f"epoch {epoch}: kNN top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")

  state, preempted = _run_loop(config=config, mesh=mesh, loader=loader, state=state,
                               step_fn=step_fn, ckpt=ckpt, logger=logger, bad_files=bad_files,
                               unit_metrics=("view1", "view2"), on_epoch_end=monitor)
  ckpt.close()
  logger.close()
  summary = dict(step=int(jax.device_get(state.step)), preempted=preempted,
                 skipped_files=bad_files.count,
                 skipped_steps=int(jax.device_get(state.skipped_steps)))
  if preempted or not config.eval.enabled:
    return summary
  if _stopped("the final evaluation"):  # the next start resumes at the end and evaluates
    return dict(summary, preempted=True)

  results = dict(pretrain_steps=summary["step"])
  if initial_encoder is None:  # resumed: the initialisation is a function of the seed
    initial_encoder = _initial_state(config, mesh).encoder()
  probe_config = _linear_config(config, source.num_classes)
  probe_fns = (evaluate.make_linear_step(probe_config, mesh),
               evaluate.make_linear_eval(probe_config, mesh))
  unreadable = set()
  for suffix, variables in (("", state.encoder()), ("_init", initial_encoder)):
    what = "pre-trained" if not suffix else "initial"
    if _stopped(f"evaluating the {what} encoder"):
      return dict(summary, preempted=True)
    knn = knn_monitor(variables)
    unreadable.update(knn["unreadable"])
    results[f"knn_top1{suffix}"], results[f"knn_top5{suffix}"] = knn["top1"], knn["top5"]
    say(f"kNN ({what} encoder): top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%")
    linear = _linear_run(probe_config, variables, mesh, source, val_source,
                         workdir / f"linear{suffix or '_pretrained'}", probe_fns)
    if linear["preempted"]:
      return dict(summary, preempted=True)
    results[f"linear_top1{suffix}"], results[f"linear_top5{suffix}"] = (
        linear["top1"], linear["top5"])
    unreadable.update(linear["unreadable_val"])
    say(f"linear probe ({what} encoder): top-1 {linear['top1']:.2f}%, "
        f"top-5 {linear['top5']:.2f}%")
  results["pth"] = str(_export(state, config, mesh, workdir))
  results["skipped_files"] = bad_files.count
  # Evaluation leaves unreadable examples out of every metric (never substitutes them).
  results["val_examples"] = knn["val_examples"]
  results["unreadable_eval_files"] = sorted(unreadable)
  results["seconds"] = round(time.perf_counter() - started, 1)
  if _main():
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  say(json.dumps(results, indent=2))
  return {**summary, **results}


def _initial_state(config, mesh):
  """A fresh train state from train.seed, with both encoders (online and target) read from
  moby.init_from when it names a checkpoint (any format convert reads; an official MoBY
  file gives the whole state)."""
  if not config.moby.init_from:
    return train_step.create_train_state(config, jax.random.key(config.train.seed), mesh)
  import convert
  say(f"initialising from {config.moby.init_from}")
  return convert.from_pytorch(files.path(config.moby.init_from), config, mesh=mesh)


def _needs_val(config) -> bool:
  return bool(config.eval.enabled or config.eval.knn_every_epochs)


def _export(state, config, mesh, workdir):
  """The state in the official MoBY format (SPEC §5), for PyTorch: WORKDIR/moby_official.pth,
  written from memory and self-checked (convert.save) by process 0. Every process takes
  part in gathering the state when it is sharded."""
  import convert
  path = workdir / "moby_official.pth"
  state = parallel.replicate(state.replace(opt_state=None), mesh)
  if _main():
    convert.save(state, config, path, "official", source=str(workdir), force=True)
  return path


def _check_probe(config, mesh) -> None:
  """Raises ValueError naming the eval.linear.* field that cannot work, before pre-training
  (the probe of eval.enabled runs only after it)."""
  probe = config.eval.linear
  if probe.batch_size <= 0 or probe.batch_size % mesh.size:
    raise ValueError(f"eval.linear.batch_size ({probe.batch_size}) must be positive and "
                     f"divisible by the number of devices ({mesh.size})")
  if config.data.num_train_examples < probe.batch_size:
    raise ValueError(f"eval.linear.batch_size ({probe.batch_size}) is larger than the "
                     f"training split ({config.data.num_train_examples} images)")
  if probe.epochs < 1:
    raise ValueError(f"eval.linear.epochs must be >= 1, got {probe.epochs}")
  if not 0 <= probe.warmup_epochs <= probe.epochs:
    raise ValueError(f"eval.linear.warmup_epochs ({probe.warmup_epochs}) must be within "
                     f"[0, eval.linear.epochs={probe.epochs}]")
  if not (math.isfinite(probe.base_lr) and probe.base_lr > 0):
    raise ValueError(f"eval.linear.base_lr must be a positive number, got {probe.base_lr}")
  if not 0 <= probe.label_smoothing < 1:
    raise ValueError(f"eval.linear.label_smoothing must be in [0, 1), got "
                     f"{probe.label_smoothing}")


def _linear_config(config, num_classes: int) -> ml_collections.ConfigDict:
  """The linear-probe config for the quick evaluation of a pre-training run (eval.linear)."""
  probe = config.eval.linear
  return ml_collections.ConfigDict(dict(
      task="linear", model=config.model.to_dict(),
      linear=dict(source="", branch="online", step=-1, num_classes=num_classes,
                  label_smoothing=probe.label_smoothing),
      optim=dict(name="sgd", base_lr=probe.base_lr, warmup_lr=0.0, min_lr=0.0, momentum=0.9,
                 weight_decay=0.0, clip_grad=5.0, reference_batch=512),
      data=dict(config.data.to_dict(), batch_size=probe.batch_size),
      train=dict(config.train.to_dict(), epochs=probe.epochs,
                 warmup_epochs=probe.warmup_epochs, log_every_steps=10 ** 9,
                 checkpoint_every_steps=0,
                 steps_per_epoch=config.data.num_train_examples // probe.batch_size),
      eval=dict(enabled=True, every_epochs=0), parallel=dict(fsdp=False)))


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
                             batch_size=_eval_batch(self.config, self.mesh)) as batches:
      return evaluate.labelled_features(self.feature_fn, variables, batches)

  def __call__(self, variables) -> dict:
    """{"top1", "top5" (percent), "val_examples", "bank_examples", "unreadable": names}."""
    (train_x, train_y, train_bad), (val_x, val_y, val_bad) = (
        self._features(variables, s) for s in self.sources)
    result = evaluate.knn_classify(train_x, train_y, val_x, val_y,
                                   self.sources[0].num_classes, k=self.config.eval.knn_k,
                                   temperature=self.config.eval.knn_temperature)
    unreadable = (_unreadable(self.sources[0], train_bad, "kNN bank")
                  + _unreadable(self.sources[1], val_bad, "kNN val"))
    return {**result, "val_examples": len(val_y), "bank_examples": len(train_y),
            "unreadable": unreadable}


def _eval_batch(config, mesh) -> int:
  """A batch for feature extraction: data.batch_size rounded to a multiple of the devices."""
  return -(-config.data.batch_size // mesh.size) * mesh.size


def _load_encoder(config) -> dict:
  """The encoder config.linear.source points to: a pre-training workdir (its latest or
  linear.step checkpoint) or a .pth in any format convert reads (official MoBY, backbone,
  timm, mmdet, mmseg; auto-detected). linear.branch picks the online or target encoder."""
  import convert
  src = files.path(config.linear.source) if config.linear.source else None
  if src is None or not src.exists():
    raise FileNotFoundError(f"linear.source={config.linear.source!r}: give a pre-training "
                            "workdir or a .pth file")
  branch = config.linear.branch
  if branch not in ("online", "target"):
    raise ValueError(f"linear.branch must be 'online' or 'target', got {branch!r}")
  if src.is_dir():
    state, _ = checkpoint.load_state(src, None if config.linear.step < 0 else config.linear.step)
    return jax.device_get(state.encoder(branch))
  return convert.encoder_from_pytorch(src, config.model, branch=branch)


def linear_eval(config, workdir, mesh=None) -> dict:
  """Linear evaluation (config.task == "linear") of the encoder in config.linear.source on
  `mesh` (default: all devices); writes WORKDIR/results.json with top-1/top-5 on val."""
  with preemption.handling():
    return _linear_eval(config, workdir, mesh)


def _linear_eval(config, workdir, mesh) -> dict:
  started = time.perf_counter()
  if stopped := _stopped("start-up"):
    return stopped
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_deterministic(config)
  loaders.check_config(config.data)
  source = build_source(config.data, "train")
  val_source = build_source(config.data, "val") if config.eval.enabled else None
  _sync_num_examples(config, source)
  if config.linear.num_classes and config.linear.num_classes != source.num_classes:
    raise ValueError(f"linear.num_classes is {config.linear.num_classes} but "
                     f"data.dataset={config.data.dataset!r} has {source.num_classes} classes")
  with config.unlocked():
    config.linear.num_classes = source.num_classes
  optim.check_schedule(config)
  if config.eval.every_epochs < 0:
    raise ValueError(f"eval.every_epochs must be >= 0 (0: after the last epoch only), got "
                     f"{config.eval.every_epochs}")
  build_encoder(config.model)
  encoder = _load_encoder(config)
  result = _linear_run(config, encoder, mesh, source, val_source, files.path(workdir))
  result["seconds"] = round(time.perf_counter() - started, 1)
  if _main() and not result["preempted"]:
    (files.path(workdir) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  say(json.dumps(result, indent=2))
  return result


def _linear_run(config, encoder_variables, mesh, source, val_source, workdir,
                fns=None) -> dict:
  """Trains the linear head (resuming from WORKDIR's checkpoints) and evaluates it on
  `val_source` (None: no evaluation) every eval.every_epochs epochs and after the last.
  As the released code reports: `top1`, `top5` of the last evaluation, `best_top1` and
  its `best_epoch`. `fns`: (step, eval) functions of `config` to reuse."""
  workdir = files.path(workdir)
  if config.data.batch_size % mesh.size:
    raise ValueError(f"data.batch_size ({config.data.batch_size}) must be divisible by the "
                     f"number of devices ({mesh.size})")
  checkpoint.save_config(workdir, config)
  total = optim.total_steps(config)
  say(f"linear evaluation: {config.model.name}, {len(source)} images, "
      f"{source.num_classes} classes, batch {config.data.batch_size}, "
      f"{config.train.epochs} epochs = {total} steps")
  ckpt = checkpoint.Checkpointer(workdir, config, config.train.checkpoint_every_steps,
                                 config.train.keep_checkpoints)
  step_fn, eval_fn = fns or (evaluate.make_linear_step(config, mesh),
                             evaluate.make_linear_eval(config, mesh))
  loader = loaders.linear_train_loader(config, source)
  state = evaluate.create_linear_state(config, encoder_variables,
                                       jax.random.key(config.train.seed), mesh)
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  # Evaluations so far: [epoch, top1, top5]; saved with the checkpoints (best survives
  # a resume).
  history: list[list] = []
  if restored is not None:
    state, data_state, step = restored
    loader.set_state(data_state)
    history = data_state.get("val", [])
    say(f"resumed linear evaluation at step {step}")
  logger = MetricLogger(workdir, total, config.train.steps_per_epoch, config.data.batch_size,
                        unit="images")
  bad_files = _BadFiles(source)
  last = {}

  def validate(state, epoch):
    last.update(_linear_accuracy(config, mesh, state, eval_fn, val_source))
    history[:] = [h for h in history if h[0] != epoch] + [[epoch, last["top1"], last["top5"]]]
    logger.scalars(epoch * config.train.steps_per_epoch,
                   {"val/top1": last["top1"], "val/top5": last["top5"]})
    say(f"linear evaluation, epoch {epoch}: top-1 {last['top1']:.2f}%, top-5 "
        f"{last['top5']:.2f}% on {last['val_examples']} val images")

  every = config.eval.every_epochs if val_source is not None else 0

  def on_epoch_end(state, epoch):
    if every and (epoch % every == 0 or epoch == config.train.epochs):
      validate(state, epoch)

  state, preempted = _run_loop(config=config, mesh=mesh, loader=loader, state=state,
                               step_fn=step_fn, ckpt=ckpt, logger=logger, bad_files=bad_files,
                               unit_metrics=("image", "label"), on_epoch_end=on_epoch_end,
                               progress=lambda: {"val": history})
  ckpt.close()
  result = dict(step=int(jax.device_get(state.step)), preempted=preempted,
                skipped_files=bad_files.count)
  if not preempted and val_source is not None:
    if not last:  # validated only at the end, or resumed after the last epoch
      validate(state, config.train.epochs)
    best = max(history, key=lambda h: h[1])
    result.update(last, best_top1=best[1], best_epoch=best[0])
  logger.close()
  return result


def _linear_accuracy(config, mesh, state, eval_fn, val_source) -> dict:
  """Top-1/top-5 (percent) of the probe over the val examples that can be decoded; the
  others are left out of the metric and named."""
  top1 = top5 = valid = 0
  bad: set[int] = set()
  with loaders.eval_loader(config, val_source, batch_size=_eval_batch(config, mesh)) as batches:
    for batch in batches:
      labels = np.where(batch["valid"], batch["label"], -1)  # invalid rows count as neither
      c1, c5 = eval_fn(state, batch["image"], labels)
      top1, top5 = top1 + int(c1), top5 + int(c5)
      valid += int(np.sum(batch["valid"]))
      bad.update(int(i) for i in batch["bad"] if i >= 0)
  valid = int(np.sum(parallel.global_rows(np.asarray([valid]))))
  unreadable = _unreadable(val_source, parallel.union_over_processes(bad), "linear val")
  if not valid:
    raise RuntimeError(f"none of the {len(val_source)} val examples could be decoded")
  return dict(top1=100.0 * top1 / valid, top5=100.0 * top5 / valid, val_examples=valid,
              unreadable_val=unreadable)
