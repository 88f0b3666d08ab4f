"""Data sources (TFDS, image folder, embedded) and loaders (host decode + crop; per-process sharding)."""
