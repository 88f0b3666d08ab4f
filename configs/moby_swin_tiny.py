"""MoBY pre-training of Swin-T, as configs/moby_swin_tiny.yaml of the release (SPEC §2).

300 epochs, 5 warm-up, AdamW base LR 1e-3 (scaled by global batch / 512), weight decay
0.05, clip 5.0, global batch 512, 224 px, T 0.2, momentum 0.99, queue 4096.

  get_config()                 the released recipe
  get_config("epochs=100")     the 100-epoch rows of the paper table
  get_config("runlocal")       shrunk for a CPU: tiny Swin, 32 px, small batch and heads
"""

import ml_collections

from moby_jax.data import embedded


def parse_arg(arg: str | None) -> dict[str, str]:
  """"a=1,b" -> {"a": "1", "b": ""}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def data_config(**overrides) -> ml_collections.ConfigDict:
  """data.*: the source and the host-side loader."""
  return ml_collections.ConfigDict(dict(dict(
      dataset="imagenet2012",  # a TFDS name, "folder" (data.path) or "embedded"
      path="",                 # folder: <path>/train/<class>/<image>, <path>/val/...
      data_dir="",             # TFDS data_dir ("" = TFDS default)
      batch_size=512,          # the global batch, over all devices and hosts
      num_train_examples=0,    # set from the training split when it differs
      crop_scale=(0.08, 1.0),  # RandomResizedCrop area range
      # Evaluation (kNN, linear probe): shorter side to floor(img_size / eval_crop_pct),
      # then a centre crop of img_size. 0.875 gives 256 at 224, the released
      # `Resize(img_size + 32)`, and keeps that share of the image at any other size.
      eval_crop_pct=0.875,
      # Decoding: "processes" (grain worker processes, each building whole batches: what
      # a host feeding 8 GPUs needs) or "threads" (per-example decode threads in the
      # training process: enough for a few cores). num_workers 0: one per CPU core.
      worker_mode="processes",
      num_workers=0,
      prefetch_batches=4,      # host batches decoded ahead
      device_prefetch=2), **overrides))  # batches placed on the devices ahead of their step


def train_config(num_train_examples, batch_size, **overrides) -> ml_collections.ConfigDict:
  """train.*: schedule length, seed, logging and checkpoint cadence."""
  c = ml_collections.ConfigDict(dict(dict(
      epochs=300, warmup_epochs=5, seed=0, log_every_steps=50,
      checkpoint_every_steps=1000, keep_checkpoints=3,
      # Stop with an error (after saving) once this many steps in a row had a non-finite
      # loss or gradient (checked at log steps; 0: never).
      max_consecutive_skipped_steps=20,
      # The two views one after the other (a scan: half the activation memory) or as one
      # batch (larger matmuls, faster where memory allows). Same numbers either way.
      views_in_scan=True,
      # GPUs: XLA's deterministic ops (set before JAX starts; train.py does it), so that a
      # resumed run is bit-identical to an uninterrupted one. Slower.
      deterministic=False,
      # MFU: the peak TFLOP/s of one device; 0 takes it from moby_jax.costs.PEAKS for the
      # device kind and model.dtype (CPUs and unlisted devices: no MFU is logged).
      peak_tflops=0.0,
      # A jax.profiler trace of steps (first, count) into WORKDIR/profile ((0, 0): none);
      # touching WORKDIR/PROFILE traces the next profile_on_demand_steps steps of a
      # running job (looked for at log steps). Process 0 only unless profile_all_processes.
      profile_steps=(0, 0), profile_on_demand_steps=10, profile_all_processes=False),
      **overrides))
  # The loader drops the last partial batch of each epoch.
  c.steps_per_epoch = num_train_examples // batch_size
  return c


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """eval.*: kNN (k, temperature as in DINO) and the quick linear probe of eval.enabled."""
  return ml_collections.ConfigDict(dict(dict(
      enabled=False, knn_every_epochs=0, knn_k=20, knn_temperature=0.07,
      # kNN bank: at most this many training images, drawn once by train.seed (0: all;
      # a pass costs one forward per image, and the features stay in host memory).
      knn_max_train_examples=0,
      linear=ml_collections.ConfigDict(dict(
          epochs=10, warmup_epochs=1, batch_size=256, base_lr=1.0, label_smoothing=0.1))),
      **overrides))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.task = "moby"

  c.model = ml_collections.ConfigDict(dict(
      name="swin_tiny", img_size=224, window_size=7, drop_path_rate=0.2,  # online encoder
      norm_before_mlp="ln", dtype="bfloat16", remat="none"))

  c.moby = ml_collections.ConfigDict(dict(
      target_drop_path_rate=0.0, momentum=0.99, temperature=0.2, queue_size=4096,
      proj_layers=2, pred_layers=2, proj_hidden_dim=4096, pred_hidden_dim=4096,
      proj_dim=256,
      # A .pth to start from (both encoders; any format convert reads, e.g. a supervised
      # Swin-T); "" starts from random weights. Ignored when the workdir has a checkpoint.
      init_from=""))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", base_lr=1e-3, warmup_lr=5e-7, min_lr=5e-6, weight_decay=0.05,
      betas=(0.9, 0.999), eps=1e-8, clip_grad=5.0,
      reference_batch=512))  # LRs are scaled by data.batch_size / reference_batch

  c.data = data_config(dataset="imagenet2012", batch_size=512,  # global, all hosts
                       num_train_examples=1_281_167)

  c.train = train_config(epochs=int(args.get("epochs", 300)), warmup_epochs=5,
                         num_train_examples=c.data.get_ref("num_train_examples"),
                         batch_size=c.data.get_ref("batch_size"))

  # eval.enabled: after pre-training, kNN and linear probe of the pre-trained encoder and
  # of the same encoder at initialisation, results.json and a .pth export (meant for small
  # data; on ImageNet run configs/linear_swin_tiny.py instead). eval.knn_every_epochs: a
  # kNN monitor on the val split during pre-training (0: off).
  c.eval = eval_config(enabled=False, knn_every_epochs=0)

  # Per-pixel augmentations inside the jitted step (uint8 crops in the batch); False
  # expects float32 normalised views from the host.
  c.augment = ml_collections.ConfigDict(dict(on_device=True))

  # fsdp=True shards params, target params and optimizer state over the data axis;
  # fsdp_group=k (with fsdp) over groups of k devices instead, replicated across groups (a
  # data x fsdp mesh; 0: one group of all devices).
  c.parallel = ml_collections.ConfigDict(dict(fsdp=False, fsdp_group=0))

  if "runlocal" in args:
    c.model.update(name="swin_mu", img_size=32, window_size=4, dtype="float32")
    c.moby.update(queue_size=256, proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=32)
    per_class, _ = embedded.SPLITS["train"]
    c.data.update(dataset="embedded", batch_size=16, worker_mode="threads", num_workers=2,
                  num_train_examples=per_class * embedded.NUM_CLASSES)
    c.train.update(epochs=2, warmup_epochs=1, log_every_steps=10, checkpoint_every_steps=100)
  return c
