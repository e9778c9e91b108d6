"""On-disk cache of teacher image embeddings, so SAM-ViT runs once per image, not once per epoch.

Layout: ``ROOT/<teacher>-<sha256 of the checkpoint, 16 hex>/<image_id % 1000:03d>/<image_id>.npy``
holding the (256, 64, 64) embedding in float16 (2 MiB per image). The checkpoint hash in the
folder name means a different teacher file never reuses another's embeddings. Each file is
written under a unique temporary name and renamed, so any number of ranks (or runs) can fill
the cache at once: the last rename wins and every reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..utils.io import atomic_path, write_json_atomic

EMBEDDING_SHAPE = (256, 64, 64)


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


class TeacherCache:
    """fp16 teacher embeddings keyed by image id, for one teacher checkpoint.

    Args:
      root: the cache folder (``--teacher-cache``).
      teacher: teacher name (``vit_h`` ...), part of the key.
      checkpoint_hash: SHA-256 of the teacher checkpoint file, part of the key.
    """

    def __init__(self, root: str | os.PathLike[str], *, teacher: str, checkpoint_hash: str) -> None:
        self.folder = Path(root).expanduser() / f"{teacher}-{checkpoint_hash[:16]}"
        self.teacher = teacher
        self.checkpoint_hash = checkpoint_hash

    def describe(self, checkpoint: str) -> None:
        """Write ``teacher.json`` naming what the embeddings came from (main rank)."""
        write_json_atomic(
            self.folder / "teacher.json",
            {"teacher": self.teacher, "checkpoint": str(checkpoint), "sha256": self.checkpoint_hash},
        )

    def path(self, image_id: int) -> Path:
        return self.folder / f"{image_id % 1000:03d}" / f"{image_id}.npy"

    def load(self, image_id: int) -> torch.Tensor | None:
        """The cached (256, 64, 64) float16 embedding, or None (absent or unreadable: recomputed)."""
        path = self.path(image_id)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape != EMBEDDING_SHAPE or arr.dtype != np.float16:
            return None
        return torch.from_numpy(arr)

    def store(self, image_id: int, embedding: torch.Tensor) -> None:
        """Atomically write one (256, 64, 64) embedding (converted to float16)."""
        arr = embedding.detach().to("cpu", torch.float16).numpy()
        if arr.shape != EMBEDDING_SHAPE:
            raise ValueError(f"teacher embedding must be {EMBEDDING_SHAPE}, got {arr.shape}")
        with atomic_path(self.path(image_id)) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.npy"))

    def __repr__(self) -> str:
        return f"TeacherCache({json.dumps(str(self.folder))})"
