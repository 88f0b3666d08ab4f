"""Quick start: MoBY on the embedded dataset with a tiny Swin, on a CPU in minutes.

  python train.py --config configs/quickstart.py --workdir /tmp/moby_quickstart

Pre-trains `swin_mu` (32 px) on the generated dataset (moby_jax/data/embedded.py), then
evaluates the pre-trained online encoder and the same encoder at initialisation with kNN
(k=20, T=0.07) and a linear probe, exports the MoBY state as WORKDIR/moby_official.pth
and writes WORKDIR/results.json. Every field of the MoBY configs can be overridden, e.g.
--config.train.epochs=5 or --config.train.seed=1.
"""

from configs import moby_swin_tiny


def get_config(arg: str | None = None):
  c = moby_swin_tiny.get_config("runlocal")
  c.model.update(name="swin_mu", img_size=32, window_size=4, drop_path_rate=0.0,
                 dtype="float32")
  c.moby.update(queue_size=1024, proj_hidden_dim=256, pred_hidden_dim=256, proj_dim=64)
  c.optim.update(base_lr=2e-3, reference_batch=128)  # LR 2e-3 at batch 128
  # Crops of 20-100% of the image (ImageNet's 0.08 works about as well here: kNN gain
  # +28.5 vs +29.2 points on seed 0 when tuned); this is the setting the measured
  # results in the README come from.
  c.data.update(dataset="embedded", batch_size=128, worker_mode="threads", num_workers=2,
                crop_scale=(0.2, 1.0))
  c.train.update(epochs=20, warmup_epochs=1, log_every_steps=20, checkpoint_every_steps=200)
  c.eval.update(enabled=True, knn_every_epochs=10)
  c.eval.linear.update(epochs=10, warmup_epochs=1, batch_size=256, base_lr=1.0)
  del arg
  return c
