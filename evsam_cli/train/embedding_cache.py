"""On-disk cache of image embeddings from a frozen encoder: computed once per image, reused by every
later epoch, rank and run. One mechanism for distillation (the SAM-ViT teacher's embeddings) and
for ``finetune --freeze-encoder`` (the model's own frozen encoder).

Layout::

    ROOT/<encoder>-<weights hash, 16 hex>-<input size>-<dtype>/<key[:2]>/<key>.pt

``key`` is the SHA-256 of the decoded image (pixels and shape), so the same picture is found
whatever its file name or dataset id, and two datasets never share an entry by accident. The
folder name holds everything else the embedding depends on: another checkpoint, input size or
precision is another folder, never a stale read. Each file is ``torch.save`` of a plain dict
``{"key": str, "embedding": Tensor}`` written under a unique temporary name and renamed, so any
number of ranks and runs can fill one cache at once: the last rename wins and every reader sees
a whole file or none. An unreadable or foreign file is a miss (recomputed and rewritten).

The data workers do the lookups (``lookup`` in the transform, ``collate_lookups`` in the
collate), so a warm batch reaches the training process as embeddings; ``CachedEmbeddings`` runs
the encoder on the misses only and stores what it computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.transforms import resize_longest_padded
from ..utils.io import atomic_path, write_json_atomic

Encode = Callable[[Tensor, Tensor], Tensor]  # (M, 3, S, S) uint8 padded, (M, 2) sizes -> (M, C, H, W)


# ---------------------------------------------------------------------------- identities
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


def weights_sha256(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict: names, dtypes, shapes and values (buffers such as BatchNorm
    statistics included), so any change to what the encoder computes changes the hash."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def image_key(image: np.ndarray) -> str:
    """The cache key of a decoded HxWx3 uint8 image: SHA-256 of its shape and pixels."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- the cache
class EmbeddingCache:
    """Embeddings of one encoder (weights), input size and dtype, keyed by image content.

    Args:
      root: the cache folder (``--embedding-cache`` / ``--teacher-cache``); may be shared.
      encoder: the encoder's name (``vit_h``, ``efficientvit-sam-l0`` ...), part of the key.
      weights_hash: SHA-256 of the encoder's weights (``file_sha256`` of the checkpoint or
        ``weights_sha256`` of the loaded state), part of the key.
      input_size: the encoder's input side, part of the key.
      dtype: the dtype embeddings are stored (and trained) in, part of the key.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        encoder: str,
        weights_hash: str,
        input_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.dtype = dtype
        dtype_name = str(dtype).removeprefix("torch.")
        self.folder = Path(root).expanduser() / f"{encoder}-{weights_hash[:16]}-{input_size}-{dtype_name}"
        self.info = {
            "encoder": encoder,
            "weights_sha256": weights_hash,
            "input_size": input_size,
            "dtype": dtype_name,
        }

    def describe(self, **source: Any) -> None:
        """Write ``cache.json`` naming what the embeddings came from (main rank)."""
        write_json_atomic(self.folder / "cache.json", {**self.info, **source})

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str) -> Tensor | None:
        """The cached embedding, or None (absent, unreadable or not this key's: recomputed)."""
        try:
            obj = torch.load(self.path(key), map_location="cpu", weights_only=True)
        except Exception:  # absent, truncated or foreign: a miss, rewritten after recomputing
            return None
        if not isinstance(obj, dict) or obj.get("key") != key:
            return None
        emb = obj.get("embedding")
        if not isinstance(emb, Tensor) or emb.dtype != self.dtype or emb.ndim != 3:
            return None
        return emb

    def store(self, key: str, embedding: Tensor) -> None:
        """Atomically write one (C, H, W) embedding, converted to the cache's dtype."""
        if embedding.ndim != 3:
            raise ValueError(f"an embedding is (C, H, W), got shape {tuple(embedding.shape)}")
        emb = embedding.detach().to("cpu", self.dtype).contiguous().clone()  # a view would save its base
        with atomic_path(self.path(key)) as tmp:
            torch.save({"key": key, "embedding": emb}, tmp)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.pt"))

    def __repr__(self) -> str:
        return f"EmbeddingCache({json.dumps(str(self.folder))})"


# ---------------------------------------------------------------------------- batches
def lookup(
    cache: EmbeddingCache | None, image: np.ndarray, input_size: int, interpolation: str = "bilinear"
) -> dict[str, Any]:
    """In a data worker: the cached embedding of ``image``, or the encoder's input (resized with the
    encoder's own ``interpolation``) when it is a miss."""
    key = image_key(image) if cache is not None else ""
    embedding = cache.load(key) if cache is not None else None
    if embedding is not None:
        return {"key": key, "embedding": embedding, "pixels": None, "hw": None}
    pixels, hw = resize_longest_padded(image, input_size, interpolation)
    return {"key": key, "embedding": None, "pixels": pixels, "hw": torch.tensor(hw)}


def collate_lookups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Hits and misses of a batch in separate stacks, with their positions in the batch."""
    hit = [i for i, s in enumerate(items) if s["embedding"] is not None]
    miss = [i for i, s in enumerate(items) if s["embedding"] is None]
    return {
        "keys": [s["key"] for s in items],
        "hit_index": hit,
        "embeddings": torch.stack([items[i]["embedding"] for i in hit]) if hit else None,
        "miss_index": miss,
        "pixels": torch.stack([items[i]["pixels"] for i in miss]) if miss else None,
        "hw": torch.stack([items[i]["hw"] for i in miss]) if miss else None,
    }


class CachedEmbeddings:
    """``collate_lookups`` batch -> (B, C, H, W) embeddings on ``device``: hits as read, misses from
    ``encode`` (then stored). Counts hits, misses and encoder calls (images) of this process.

    ``encode`` returns embeddings in the dtype they are trained in; a cold run uses exactly what a
    warm run will read back.
    """

    def __init__(self, encode: Encode, cache: EmbeddingCache | None, device: torch.device) -> None:
        self.encode = encode
        self.cache = cache
        self.device = device
        self.hits = 0
        self.misses = 0

    def __call__(self, lookups: dict[str, Any]) -> Tensor:
        hit, miss = lookups["hit_index"], lookups["miss_index"]
        parts: dict[int, Tensor] = {}
        if hit:
            for i, emb in zip(hit, lookups["embeddings"].to(self.device), strict=True):
                parts[i] = emb
        if miss:
            fresh = self.encode(lookups["pixels"], lookups["hw"])
            if self.cache is not None:
                fresh = fresh.to(self.cache.dtype)
            for i, emb in zip(miss, fresh, strict=True):
                parts[i] = emb
                if self.cache is not None:
                    self.cache.store(lookups["keys"][i], emb)
        self.hits += len(hit)
        self.misses += len(miss)
        return torch.stack([parts[i] for i in range(len(parts))])
