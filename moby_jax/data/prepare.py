"""Prepare a TFDS image-classification dataset for training: `python -m moby_jax.data.prepare`.

  python -m moby_jax.data.prepare imagenet2012 --manual_dir MANUAL_DIR --data_dir DATA_DIR

Builds the dataset with TFDS's builder API in ArrayRecord format (random access, what
the loaders read), then opens every split the way training does and prints how to use
it. For ImageNet, MANUAL_DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
as downloaded (TFDS re-encodes the CMYK and PNG files among them while building). Any
TFDS image-classification dataset goes the same way: with its manual files in
--manual_dir, or downloaded by TFDS when it can be.

Preparation needs TensorFlow and importlib_resources (requirements-prepare.txt); TFDS's
own `tfds build` CLI needs more (apache_beam, mlcroissant) that it does not declare.
Training does not need any of them.
"""

import argparse
import importlib.util
import pathlib
import sys
import time

REQUIREMENTS = "requirements-prepare.txt"
# What the builder expects in manual_dir, for the datasets we know.
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def check_requirements() -> None:
  """Raises SystemExit naming the install command when a preparation package is missing."""
  missing = [m for m in ("tensorflow", "importlib_resources", "tensorflow_datasets",
                         "array_record") if importlib.util.find_spec(m) is None]
  if missing:
    raise SystemExit(f"preparing a dataset needs {', '.join(missing)}: "
                     f"python3 -m pip install -r {REQUIREMENTS}")


def check_manual_dir(name: str, manual_dir: str | None) -> None:
  """Raises SystemExit when the files a known builder needs are not in manual_dir."""
  needed = MANUAL_FILES.get(name)
  if needed is None:
    return
  if not manual_dir:
    raise SystemExit(f"{name} needs --manual_dir (a folder with {' and '.join(needed)})")
  missing = [f for f in needed if not (pathlib.Path(manual_dir) / f).is_file()]
  if missing:
    raise SystemExit(f"--manual_dir {manual_dir} lacks {', '.join(missing)} (expected "
                     f"{' and '.join(needed)}, as downloaded from image-net.org)")


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> dict[str, int]:
  """Builds `name` into `data_dir` as ArrayRecord; returns {split: number of examples}.

  Checks afterwards that every split opens as a training source (image + label
  features, random access).
  """
  import tensorflow_datasets as tfds
  from moby_jax.data.sources import TfdsSource
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  has_val = bool({"validation", "val", "test"} & set(counts))
  for split in ("train", "val") if has_val else ("train",):
    source = TfdsSource(name, split, data_dir)
    source[0]  # reads and parses one record, as the loaders do
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moby_jax.data.prepare", description=__doc__.split("\n")[0],
      epilog="Then train with --config.data.dataset=NAME --config.data.data_dir=DATA_DIR.")
  parser.add_argument("name", help="TFDS dataset name, e.g. imagenet2012")
  parser.add_argument("--data_dir", required=True,
                      help="where to write the prepared dataset (TFDS data_dir)")
  parser.add_argument("--manual_dir", help="folder with the manually downloaded files")
  args = parser.parse_args(argv)
  check_requirements()
  check_manual_dir(args.name, args.manual_dir)
  started = time.perf_counter()
  print(f"preparing {args.name} into {args.data_dir} (ArrayRecord)...", flush=True)
  counts = prepare(args.name, args.data_dir, args.manual_dir)
  print(f"prepared {args.name} in {time.perf_counter() - started:.0f}s: "
        + ", ".join(f"{split} {n}" for split, n in sorted(counts.items())))
  print(f"train with: --config.data.dataset={args.name} --config.data.data_dir={args.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
