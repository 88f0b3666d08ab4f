"""The embedded dataset: shapes, balance, determinism (pinned bytes), and its nuisances."""

import hashlib

import numpy as np
import pytest

from moby_jax.data import embedded

# sha256 of images.tobytes() + labels.tobytes(). A change here changes every quick-start
# number: re-measure the quick start (configs/quickstart.py, seeds 0-2) before re-pinning.
CHECKSUMS = {
    "train": "149b5750dcbdade1e7998d6340f7d57a6bd364b55bdd09e9eeeea610d987b20c",
    "val": "c9f784d6cbf2b4ce4adaf3ff99f2b1d8f2f18684593589d914fc4f191e1504e1",
}


def digest(images, labels) -> str:
  return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


@pytest.mark.parametrize("split, size", [("train", 5000), ("val", 1000)])
def test_shapes_dtypes_and_balance(split, size):
  images, labels = embedded.load(split)
  s = embedded.IMAGE_SIZE
  assert images.shape == (size, s, s, 3) and images.dtype == np.uint8
  assert labels.shape == (size,) and labels.dtype == np.int32
  assert embedded.NUM_CLASSES == len(embedded.CLASS_NAMES) == 10
  np.testing.assert_array_equal(np.bincount(labels, minlength=embedded.NUM_CLASSES),
                                size // embedded.NUM_CLASSES)
  assert images.min() == 0 and images.max() == 255
  # Shuffled, not in class blocks.
  assert len(np.unique(labels[:50])) == embedded.NUM_CLASSES


@pytest.mark.parametrize("split", ["train", "val"])
def test_bytes_are_pinned_and_regenerate_identically(split):
  images, labels = embedded.load(split)
  assert digest(images, labels) == CHECKSUMS[split]
  fresh_images, fresh_labels = embedded._generate.__wrapped__(split)  # bypasses the cache
  assert digest(fresh_images, fresh_labels) == CHECKSUMS[split]


def test_cached_and_read_only():
  images, labels = embedded.load("val")
  assert embedded.load("val")[0] is images
  with pytest.raises(ValueError):
    images[0, 0, 0, 0] = 1
  with pytest.raises(ValueError):
    labels[0] = 1


def test_splits_differ():
  train, val = embedded.load("train")[0], embedded.load("val")[0]
  train_keys = {x.tobytes() for x in train}
  assert not any(x.tobytes() in train_keys for x in val)


def test_unknown_split_names_the_valid_ones():
  with pytest.raises(ValueError, match="'test'.*'train'.*'val'"):
    embedded.load("test")


def test_brightness_does_not_give_the_class_away():
  # Polarity is drawn independently of the class, so every class has about the same mean
  # grey level; the label has to come from the pattern's structure.
  images, labels = embedded.load("train")
  means = images.reshape(len(images), -1).mean(axis=1) / 255.0
  class_means = np.array([means[labels == c].mean() for c in range(embedded.NUM_CLASSES)])
  assert np.ptp(class_means) < 0.1, class_means
