"""A local Google Cloud Storage emulator for tests: `python gcs_emulator.py PORT DATA_DIR BUCKET`.

gcp-storage-emulator serves GCS's JSON API, but its media downloads leave out the
`x-goog-generation` / `x-goog-metageneration` headers that real GCS sends and that
tensorstore (orbax's array storage) reads to make conditional writes; this script adds
them, then serves on 127.0.0.1:PORT with BUCKET created, until it is terminated.
"""

import sys

from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
  objects_download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the original handler answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects_download, objects.download = objects.download, _download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402  (reads objects.download)


if __name__ == "__main__":
  port, data_dir, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  create_server("127.0.0.1", port, default_bucket=bucket, data_dir=data_dir).run()
