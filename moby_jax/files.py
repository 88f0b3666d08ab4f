"""Workdir files through one path abstraction (etils.epath), local or in a bucket.

`path(p)` is an `epath.Path` for a local path or a URI (gs://, s3://, ...), the same
abstraction orbax and TFDS use, so a run's checkpoints, config, logs, results and
exports can all live in a bucket. Object stores cannot append to a file, so
`AppendFile` appends on local disks and rewrites the whole object elsewhere, and
TensorBoard event files in a bucket are written the same way (`tensorboard_writer`).
"""

import io
import os

from etils import epath


def path(p) -> epath.Path:
  """`p` as an epath.Path; local paths are made absolute (orbax needs that)."""
  p = epath.Path(p)
  return p.absolute() if is_local(p) else p


def is_local(p) -> bool:
  return "://" not in os.fspath(p)


class AppendFile:
  """A text file written by appending (metrics.jsonl), locally or in a bucket.

  Locally: opened in append mode and flushed after each write. In a bucket: the existing
  content is read once and the whole object is rewritten at each flush.
  """

  def __init__(self, p):
    self.path = path(p)
    if is_local(self.path):
      self._local = open(self.path, "a")
    else:
      self._local = None
      self._content = io.StringIO()
      if self.path.exists():
        self._content.write(self.path.read_text())

  def write(self, text: str) -> None:
    (self._local or self._content).write(text)

  def flush(self) -> None:
    if self._local is not None:
      self._local.flush()
    else:
      self.path.write_text(self._content.getvalue())

  def close(self) -> None:
    self.flush()
    if self._local is not None:
      self._local.close()


class _RemoteRecordFile:
  """tensorboardX's record-writer interface over an object in a bucket: the events are
  kept in memory and the object is rewritten at each flush (as tensorboardX's own GCS
  writer does)."""

  def __init__(self, p):
    self.path = epath.Path(p)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteRecordFactory:

  def open(self, p):
    return _RemoteRecordFile(p)

  def directory_check(self, p):
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(logdir):
  """A tensorboardX SummaryWriter for `logdir`, local or in any bucket epath reaches."""
  from tensorboardX import SummaryWriter, record_writer
  logdir = os.fspath(path(logdir))
  if not is_local(logdir):
    record_writer.register_writer_factory(logdir.split("://")[0], _RemoteRecordFactory())
  return SummaryWriter(logdir)
