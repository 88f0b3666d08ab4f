"""Linear evaluation of a MoBY Swin-T (SPEC §4): a Linear head on the frozen encoder.

SGD with Nesterov momentum 0.9, base LR 1.0 x global batch / 512, no weight decay, 100
epochs (5 warm-up) with the cosine schedule, clip 5, label smoothing 0.1; the backbone
stays in training mode (drop path 0.2), as in the released code. Train transform:
RandomResizedCrop + flip; eval: shorter side to 256 (img_size / data.eval_crop_pct, the
released img_size + 32 at 224), centre crop 224.
Validation every epoch; results.json reports the last top-1/top-5 and the best top-1.

  --config.linear.source=WORKDIR     a pre-training workdir (its latest checkpoint)
  --config.linear.source=FILE.pth    an official-format MoBY .pth or a backbone .pth

  get_config()            the released recipe on ImageNet
  get_config("runlocal")  the tiny model on the embedded data, for a CPU
"""

import ml_collections

from configs import moby_swin_tiny


def get_config(arg: str | None = None, model=None) -> ml_collections.ConfigDict:
  args = moby_swin_tiny.parse_arg(arg)
  pretrain = moby_swin_tiny.get_config("runlocal" if "runlocal" in args else None)
  c = ml_collections.ConfigDict()
  c.task = "linear"
  c.model = pretrain.model if model is None else ml_collections.ConfigDict(model)
  c.model.drop_path_rate = 0.0 if "runlocal" in args else 0.2
  c.linear = ml_collections.ConfigDict(dict(
      source="",             # pre-training workdir or .pth (required)
      branch="online",       # which encoder of a MoBY checkpoint: online or target
      step=-1,               # checkpoint step of a workdir (-1: latest)
      num_classes=1000,      # set from the dataset when it differs
      label_smoothing=0.1))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", base_lr=1.0, warmup_lr=5e-7, min_lr=5e-6, momentum=0.9, weight_decay=0.0,
      clip_grad=5.0, reference_batch=512))
  c.data = moby_swin_tiny.data_config(dataset=pretrain.data.dataset,
                                      batch_size=pretrain.data.batch_size,
                                      worker_mode=pretrain.data.worker_mode,
                                      num_workers=pretrain.data.num_workers,
                                      num_train_examples=pretrain.data.num_train_examples)
  c.train = moby_swin_tiny.train_config(epochs=100, warmup_epochs=5,
                                        num_train_examples=c.data.get_ref("num_train_examples"),
                                        batch_size=c.data.get_ref("batch_size"))
  # Top-1/top-5 on val every `every_epochs` epochs and after the last (0: after the last
  # only); results.json reports the last and the best, as the released code does.
  c.eval = ml_collections.ConfigDict(dict(enabled=True, every_epochs=1))
  c.parallel = ml_collections.ConfigDict(dict(fsdp=False, fsdp_group=0))
  if "runlocal" in args:
    c.train.update(epochs=2, warmup_epochs=1, log_every_steps=10, checkpoint_every_steps=100)
    c.linear.num_classes = 0
  return c
