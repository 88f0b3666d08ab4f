"""MoBY pre-training of Swin-T, as configs/moby_swin_tiny.yaml of the release (SPEC §2).

300 epochs, 5 warm-up, AdamW base LR 1e-3 (scaled by global batch / 512), weight decay
0.05, clip 5.0, global batch 512, 224 px, T 0.2, momentum 0.99, queue 4096.

  get_config()                 the released recipe
  get_config("epochs=100")     the 100-epoch rows of the paper table
  get_config("runlocal")       shrunk for a CPU: tiny Swin, 32 px, small batch and heads
"""

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str]:
  """"a=1,b" -> {"a": "1", "b": ""}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.task = "moby"

  c.model = ml_collections.ConfigDict(dict(
      name="swin_tiny", img_size=224, window_size=7, drop_path_rate=0.2,  # online encoder
      norm_before_mlp="ln", dtype="bfloat16", remat=False))

  c.moby = ml_collections.ConfigDict(dict(
      target_drop_path_rate=0.0, momentum=0.99, temperature=0.2, queue_size=4096,
      proj_layers=2, pred_layers=2, proj_hidden_dim=4096, pred_hidden_dim=4096,
      proj_dim=256))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", base_lr=1e-3, warmup_lr=5e-7, min_lr=5e-6, weight_decay=0.05,
      betas=(0.9, 0.999), eps=1e-8, clip_grad=5.0,
      reference_batch=512))  # LRs are scaled by data.batch_size / reference_batch

  c.data = ml_collections.ConfigDict(dict(
      dataset="imagenet2012", batch_size=512,  # global batch, over all devices and hosts
      num_train_examples=1_281_167))

  c.train = ml_collections.ConfigDict(dict(epochs=int(args.get("epochs", 300)),
                                           warmup_epochs=5, seed=0))
  # The loader drops the last partial batch.
  c.train.steps_per_epoch = (c.data.get_ref("num_train_examples")
                             // c.data.get_ref("batch_size"))

  # Per-pixel augmentations inside the jitted step (uint8 crops in the batch); False
  # expects float32 normalised views from the host.
  c.augment = ml_collections.ConfigDict(dict(on_device=True))

  # fsdp=True shards params, target params and optimizer state over the data axis.
  c.parallel = ml_collections.ConfigDict(dict(fsdp=False))

  if "runlocal" in args:
    c.model.update(name="swin_mu", img_size=32, window_size=4, dtype="float32")
    c.moby.update(queue_size=256, proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=32)
    c.data.update(batch_size=16, num_train_examples=1024)
    c.train.update(epochs=2, warmup_epochs=1)
  return c
