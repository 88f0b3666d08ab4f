"""MoBY pre-training of DeiT-S: the Swin-T recipe with ENCODER deit_small (SPEC §2)."""

from configs import moby_swin_tiny


def get_config(arg: str | None = None):
  c = moby_swin_tiny.get_config(arg)
  if "runlocal" in moby_swin_tiny.parse_arg(arg):
    c.model = dict(name="deit_mu", img_size=32, drop_path_rate=0.2, dtype="float32",
                   remat="none")
  else:
    c.model = dict(name="deit_small", img_size=224, drop_path_rate=0.2, dtype="bfloat16",
                   remat="none")
  return c
