"""Data sources and loaders: shapes, ranges, crop statistics, determinism, corrupt files."""

import io
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from moby_jax import augment
from moby_jax.data import examples, loader, sources, transforms


def loader_config(**data):
  return ml_collections.ConfigDict(dict(
      model=dict(img_size=32),
      data=dict(dict(dataset="folder", path="", data_dir="", batch_size=8,
                     crop_scale=(0.08, 1.0), worker_mode="threads", num_workers=2,
                     prefetch_batches=2, eval_crop_pct=0.875), **data),
      train=dict(seed=0, steps_per_epoch=4), augment=dict(on_device=True)))


def array_source(n=40, size=48, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth colourful images: a random gradient per image plus a class-dependent stripe.
  yy, xx = np.mgrid[:size, :size] / size
  images = []
  for i in range(n):
    a, b, c = rng.uniform(0, 1, 3)
    img = np.stack([a * yy + (1 - a) * xx, b * xx, c * (1 - yy)], -1)
    images.append((255 * img).astype(np.uint8))
  return sources.ArraySource(np.stack(images), np.arange(n) % classes, classes)


def write_folder(root: pathlib.Path, per_class=6, classes=("cat", "dog"), size=(40, 30)):
  rng = np.random.default_rng(1)
  for split in ("train", "val"):
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        fmt = "JPEG" if i % 2 else "PNG"
        Image.fromarray(pixels).save(folder / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
  return root


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_pretrain_batches_shapes_dtypes_and_views_differ():
  batches = take(loader.pretrain_loader(loader_config(), array_source()), 3)
  for b in batches:
    assert set(b) == {"view1", "view2", "row", "bad"}
    for view in ("view1", "view2"):
      assert b[view].shape == (8, 32, 32, 3) and b[view].dtype == np.uint8
      assert b[view].min() >= 0 and b[view].max() > 100
    assert (b["bad"] == -1).all()
    # Independent crops of the same image: the views of each example differ.
    assert all((b["view1"][i] != b["view2"][i]).any() for i in range(8))
  np.testing.assert_array_equal(batches[1]["row"], np.arange(8, 16))


def test_host_side_views_are_normalised_floats():
  config = loader_config()
  config.augment.on_device = False
  b = next(loader.pretrain_loader(config, array_source()))
  for view in ("view1", "view2"):
    x = b[view]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and np.isfinite(x).all()
    lo = (0 - np.array(augment.MEAN)) / np.array(augment.STD)
    hi = (1 - np.array(augment.MEAN)) / np.array(augment.STD)
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()


def test_grayscale_share_of_host_side_views():
  # The whole per-view pipeline on the host: about 20% of views come out gray.
  config = loader_config(batch_size=250)
  config.augment.on_device = False
  config.train.steps_per_epoch = 1
  gray = []
  for b in take(loader.pretrain_loader(config, array_source(n=250)), 8):
    for view in ("view1", "view2"):
      pixels = b[view] * np.float32(augment.STD) + np.float32(augment.MEAN)
      spread = np.ptp(pixels, axis=-1).max(axis=(1, 2))
      gray.append(spread < 1e-5)
  share = np.concatenate(gray).mean()  # 4000 views
  assert abs(share - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 4000), share


def test_crop_box_statistics():
  rng = np.random.default_rng(0)
  boxes = np.array([transforms.crop_box(rng, 200, 150) for _ in range(4000)])
  left, top, w, h = boxes.T
  assert (left >= 0).all() and (top >= 0).all()
  assert (left + w <= 200).all() and (top + h <= 150).all()
  area = w * h / (200 * 150)
  assert area.min() >= 0.07 and area.max() <= 1.0
  ratio = w / h
  assert (ratio > 0.7).all() and (ratio < 1.4).all()
  # log-uniform aspect ratio: symmetric around 1 (before the fit constraint bites).
  assert abs(np.median(np.log(ratio))) < 0.05


def test_flip_rate_and_crop_output():
  image = np.zeros((20, 20, 3), np.uint8)
  image[:, :10] = 255  # left half white
  rng = np.random.default_rng(0)
  flipped = []
  for _ in range(2000):
    crop, = transforms.random_crops(image, rng, 8, 1, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert crop.shape == (8, 8, 3) and crop.dtype == np.uint8
    flipped.append(crop[:, 0].mean() < crop[:, -1].mean())
  assert abs(np.mean(flipped) - 0.5) < 5 * np.sqrt(0.25 / 2000)


def test_center_crop_geometry():
  image = np.zeros((60, 90, 3), np.uint8)
  image[:, 44:46] = 255  # a vertical line through the centre
  out = transforms.center_crop(image, 32, transforms.eval_resize(32))
  assert out.shape == (32, 32, 3)
  column = out.mean(axis=(0, 2))
  assert abs(int(np.argmax(column)) - 15.5) <= 1.5


def test_same_step_same_examples_whatever_the_process_count(monkeypatch):
  config = loader_config(batch_size=8)
  one = take(loader.pretrain_loader(config, array_source()), 6)
  parts = []
  for index in range(2):
    monkeypatch.setattr(loader.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loader.jax, "process_index", lambda i=index: i)
    parts.append(take(loader.pretrain_loader(config, array_source()), 6))
  for step in range(6):
    for key in ("view1", "view2", "row"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), one[step][key])


def test_epochs_reshuffle_and_drop_the_remainder():
  source = array_source(n=20)
  config = loader_config(batch_size=8)
  config.train.steps_per_epoch = 2  # 20 // 8: 4 examples dropped per epoch
  order = examples.EpochOrder(len(source), 16, seed=0)
  epoch0 = [order(t) for t in range(16)]
  epoch1 = [order(t) for t in range(16, 32)]
  assert len(set(epoch0)) == 16 and len(set(epoch1)) == 16
  assert epoch0 != epoch1


def test_worker_processes_give_the_batches_of_threads_and_resume_alike(tmp_path):
  """data.worker_mode only changes who decodes: the batches of every step are the same,
  also after restoring a position (the stream restarts at that step)."""
  root = write_folder(tmp_path / "data", per_class=10)
  source = sources.FolderSource.scan(str(root), "train")
  config = loader_config(path=str(root), batch_size=4)
  config.train.steps_per_epoch = 5
  with loader.pretrain_loader(config, source) as threads:
    want = take(threads, 7)
  config.data.worker_mode = "processes"
  with loader.pretrain_loader(config, source) as processes:
    got = take(processes, 4)
    state = processes.get_state()
  assert state == {"next_index": 4}
  with loader.pretrain_loader(config, source) as resumed:
    resumed.set_state(state)
    got += take(resumed, 3)
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  val = sources.FolderSource.scan(str(root), "val")
  with loader.eval_loader(config, val, batch_size=8) as batches:
    by_processes = list(batches)
  config.data.worker_mode = "threads"
  with loader.eval_loader(config, val, batch_size=8) as batches:
    for a, b in zip(by_processes, batches, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_bad_worker_settings_fail_clearly():
  with pytest.raises(ValueError, match="data.worker_mode"):
    loader.pretrain_loader(loader_config(worker_mode="fibers"), array_source())
  with pytest.raises(ValueError, match="data.num_workers"):
    loader.pretrain_loader(loader_config(num_workers=-1), array_source())
  for crop_pct in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"data.eval_crop_pct must be in \(0, 1\]"):
      loader.eval_loader(loader_config(eval_crop_pct=crop_pct), array_source())


def test_eval_loader_crops_by_data_eval_crop_pct():
  source = array_source(n=8, size=48)
  for crop_pct, resize in ((0.875, 36), (1.0, 32), (0.5, 64)):
    with loader.eval_loader(loader_config(eval_crop_pct=crop_pct), source) as batches:
      images = next(batches)["image"]
    for i, image in enumerate(images):
      np.testing.assert_array_equal(image, transforms.center_crop(source[i]["image"], 32, resize))


def test_resume_position_gives_the_same_batches():
  config = loader_config()
  first = loader.pretrain_loader(config, array_source())
  batches = take(first, 5)
  state = first.get_state()
  second = loader.pretrain_loader(config, array_source())
  second.set_state(state)
  nxt, again = next(first), next(second)
  for key in nxt:
    np.testing.assert_array_equal(nxt[key], again[key])
  assert not np.array_equal(batches[-1]["view1"], nxt["view1"])


def test_folder_source_and_eval_loader(tmp_path):
  root = write_folder(tmp_path / "data")
  train = sources.FolderSource.scan(str(root), "train")
  assert train.classes == ["cat", "dog"] and len(train) == 12 and train.skipped == []
  config = loader_config(path=str(root))
  batches = list(loader.eval_loader(config, sources.FolderSource.scan(str(root), "val"),
                                    batch_size=8))
  assert len(batches) == 2
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 12 and not valid[12:].any()
  labels = np.concatenate([b["label"] for b in batches])[:12]
  np.testing.assert_array_equal(labels, [0] * 6 + [1] * 6)
  assert batches[0]["image"].shape == (8, 32, 32, 3)


def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path):
  root = write_folder(tmp_path / "data")
  (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  source = sources.FolderSource.scan(str(root), "train")
  assert len(source) == 13 and len(source.skipped) == 1 and "notes.txt" in source.skipped[0]
  broken = source.files.index(str(root / "train" / "cat" / "broken.jpg"))
  config = loader_config(path=str(root), batch_size=13)
  config.train.steps_per_epoch = 1
  batch = next(loader.pretrain_loader(config, source))
  assert sorted(set(batch["bad"].tolist())) == [-1, broken]
  assert batch["view1"].shape == (13, 32, 32, 3)


def test_missing_and_empty_folders_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.path"):
    sources.build_source(ml_collections.ConfigDict(dict(dataset="folder", path=str(tmp_path))),
                         "train")
  (tmp_path / "train" / "empty_class").mkdir(parents=True)
  (tmp_path / "train" / "ok").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "ok" / "a.png")
  with pytest.raises(ValueError, match="empty_class"):
    sources.FolderSource.scan(str(tmp_path), "train")
  with pytest.raises(ValueError, match="data.path"):
    sources.build_source(ml_collections.ConfigDict(dict(dataset="folder", path="")), "train")


def test_tfds_source_with_mock_data():
  config = loader_config(dataset="imagenet2012")
  with tfds.testing.mock_data(num_examples=24):
    source = sources.build_source(config.data, "train")
    assert len(source) == 24 and source.num_classes == 1000
    batch = next(loader.pretrain_loader(config, source))
    val = sources.build_source(config.data, "val")
    first = next(loader.eval_loader(config, val, batch_size=8))
  assert batch["view1"].shape == (8, 32, 32, 3) and batch["view1"].dtype == np.uint8
  assert first["image"].shape == (8, 32, 32, 3) and first["label"].dtype == np.int32


def test_tfds_raw_records_keep_the_image_encoded():
  # Real ArrayRecord files hold serialised tf.train.Example protos; the source parses them
  # without decoding the image, so the loader can decode at the crop's size.
  from tensorflow_datasets.proto import tf_example_pb2
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buffer, "JPEG")
  example = tf_example_pb2.Example()
  example.features.feature["image"].bytes_list.value.append(buffer.getvalue())
  example.features.feature["label"].int64_list.value.append(7)
  example.features.feature["file_name"].bytes_list.value.append(b"x.JPEG")

  class Raw:
    def __init__(self, records):
      self.data_source = records

    def __len__(self):
      return len(self.data_source)

  with tfds.testing.mock_data(num_examples=4):
    source = sources.TfdsSource("imagenet2012", "train", None)
  source._source = Raw([example.SerializeToString()])
  record = source[0]
  assert isinstance(record["image"], bytes) and record["label"] == 7
  crop, = transforms.random_crops(record["image"], np.random.default_rng(0), 16, 1)
  assert crop.shape == (16, 16, 3)


def test_unknown_tfds_dataset_fails_clearly():
  with pytest.raises(FileNotFoundError, match="data.dataset"):
    sources.build_source(ml_collections.ConfigDict(dict(dataset="no_such_dataset_xyz",
                                                        data_dir="")), "train")
