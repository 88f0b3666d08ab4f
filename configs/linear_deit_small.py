"""Linear evaluation of a MoBY DeiT-S: the Swin-T linear recipe with the DeiT-S encoder."""

from configs import linear_swin_tiny, moby_deit_small


def get_config(arg: str | None = None):
  return linear_swin_tiny.get_config(arg, model=moby_deit_small.get_config(arg).model)
