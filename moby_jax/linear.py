"""Linear evaluation, the program train.py runs for config.task == "linear" (SPEC §4),
and the linear probe that pre-training's eval.enabled runs.

`linear_eval(config, workdir)` trains a Linear head on the frozen encoder that
config.linear.source names, with resume, and writes results.json with top-1/top-5 on val.
"""

import json
import time

import jax
import numpy as np

from moby_jax import checkpoint, evaluate, files, goodput, monitor, optim, parallel, \
    preemption
from moby_jax.data import loader as loaders
from moby_jax.data.sources import build_source
from moby_jax.logger import MetricLogger
from moby_jax.loop import BadFiles, end_session, eval_batch, is_main, name_unreadable, \
    run_loop, say, stop_summary, sync_num_examples
from moby_jax.models import build_encoder


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
  clock = goodput.Clock()  # from the process start when train.py marked it
  started = time.perf_counter()
  if stopped := stop_summary("start-up"):
    return stopped
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_deterministic(config)
  loaders.check_config(config.data)
  source = build_source(config.data, "train")
  val_source = build_source(config.data, "val") if config.eval.enabled else None
  sync_num_examples(config, source)
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
  result = linear_run(config, encoder, mesh, source, val_source, files.path(workdir),
                      session=goodput.Session(clock, workdir, is_main()),
                      profiler=monitor.Profiler(config, workdir, say, clock))
  result["seconds"] = round(time.perf_counter() - started, 1)
  if is_main() and not result["preempted"]:
    (files.path(workdir) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  say(json.dumps(result, indent=2))
  return result


def linear_run(config, encoder_variables, mesh, source, val_source, workdir,
               fns=None, session=None, profiler=None) -> dict:
  """Trains the linear head (resuming from WORKDIR's checkpoints) and evaluates it on
  `val_source` (None: no evaluation) every eval.every_epochs epochs and after the last.
  As the released code reports: `top1`, `top5` of the last evaluation, `best_top1` and
  its `best_epoch`. `fns`: (step, eval) functions of `config` to reuse. With a `session`
  (goodput.Session), the result has `goodput`; `profiler`: monitor.Profiler."""
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
                        unit="images", clock=session.clock if session else None)
  bad_files = BadFiles(source)
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

  state, preempted = run_loop(config=config, mesh=mesh, loader=loader, state=state,
                              step_fn=step_fn, ckpt=ckpt, logger=logger, bad_files=bad_files,
                              unit_metrics=("image", "label"), on_epoch_end=on_epoch_end,
                              progress=lambda: {"val": history}, session=session,
                              profiler=profiler)
  ckpt.close()
  result = dict(step=int(jax.device_get(state.step)), preempted=preempted,
                skipped_files=bad_files.count)
  if not preempted and val_source is not None:
    if not last:  # validated only at the end, or resumed after the last epoch
      if session:
        session.clock.set_base("evaluation")
      validate(state, config.train.epochs)
    best = max(history, key=lambda h: h[1])
    result.update(last, best_top1=best[1], best_epoch=best[0])
  if session:
    result["goodput"] = end_session(session, logger, result["step"], finished=not preempted)
  logger.close()
  return result


def _linear_accuracy(config, mesh, state, eval_fn, val_source) -> dict:
  """Top-1/top-5 (percent) of the probe over the val examples that can be decoded; the
  others are left out of the metric and named."""
  top1 = top5 = valid = 0
  bad: set[int] = set()
  with loaders.eval_loader(config, val_source, batch_size=eval_batch(config, mesh)) as batches:
    for batch in batches:
      labels = np.where(batch["valid"], batch["label"], -1)  # invalid rows count as neither
      c1, c5 = eval_fn(state, batch["image"], labels)
      top1, top5 = top1 + int(c1), top5 + int(c5)
      valid += int(np.sum(batch["valid"]))
      bad.update(int(i) for i in batch["bad"] if i >= 0)
  valid = int(np.sum(parallel.global_rows(np.asarray([valid]))))
  unreadable = name_unreadable(val_source, parallel.union_over_processes(bad), "linear val")
  if not valid:
    raise RuntimeError(f"none of the {len(val_source)} val examples could be decoded")
  return dict(top1=100.0 * top1 / valid, top5=100.0 * top5 / valid, val_examples=valid,
              unreadable_val=unreadable)
