"""Embedding cache (distillation teacher and frozen finetune encoder): keys, round trip, unreadable
files, concurrent writers, and the hit/miss batching shared by both."""

from __future__ import annotations

import threading

import numpy as np
import torch

from evsam_cli.train.embedding_cache import (
    CachedEmbeddings,
    EmbeddingCache,
    collate_lookups,
    file_sha256,
    image_key,
    lookup,
    weights_sha256,
)


def _cache(root, weights="ab" * 32, size=1024, dtype=torch.float16) -> EmbeddingCache:
    return EmbeddingCache(root, encoder="vit_h", weights_hash=weights, input_size=size, dtype=dtype)


def test_round_trip_keyed_by_weights_input_size_and_dtype(tmp_path):
    a = _cache(tmp_path)
    emb = torch.randn(256, 64, 64)
    key = image_key(np.zeros((4, 5, 3), np.uint8))
    assert a.load(key) is None
    a.store(key, emb)
    got = a.load(key)
    assert got.dtype == torch.float16 and torch.equal(got, emb.half())
    assert a.path(key).relative_to(tmp_path).parts == (
        "vit_h-" + "ab" * 8 + "-1024-float16",
        key[:2],
        key + ".pt",
    )
    # another checkpoint, input size or dtype never sees these embeddings
    for other in (
        _cache(tmp_path, weights="cd" * 32),
        _cache(tmp_path, size=512),
        _cache(tmp_path, dtype=torch.float32),
    ):
        assert other.load(key) is None
    assert len(a) == 1 and not list(tmp_path.rglob("*.tmp"))


def test_image_key_is_content_and_shape():
    img = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    assert image_key(img) == image_key(img.copy())
    assert image_key(img) != image_key(img[:, ::-1])
    assert image_key(img) != image_key(img.reshape(8, 6, 3))


def test_unreadable_foreign_or_wrong_dtype_counts_as_a_miss(tmp_path):
    cache = _cache(tmp_path, weights="0" * 64)
    k1, k2, k3 = "a1" * 32, "b2" * 32, "c3" * 32
    cache.path(k1).parent.mkdir(parents=True)
    cache.path(k1).write_bytes(b"PK truncated")
    assert cache.load(k1) is None
    cache.path(k2).parent.mkdir(parents=True)
    torch.save({"key": k3, "embedding": torch.zeros(256, 8, 8, dtype=torch.float16)}, cache.path(k2))
    assert cache.load(k2) is None  # a file renamed into another key's place
    torch.save({"key": k2, "embedding": torch.zeros(256, 8, 8)}, cache.path(k2))
    assert cache.load(k2) is None  # float32 where float16 is expected


def _writer(root, value):
    cache = _cache(root, weights="1" * 64)
    for _ in range(5):
        cache.store("42" * 32, torch.full((256, 64, 64), float(value)))


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    # Threads stand in for ranks: each write goes to its own temporary name and is renamed, so
    # the reader sees one writer's whole file whatever the interleaving.
    threads = [threading.Thread(target=_writer, args=(tmp_path, v)) for v in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = _cache(tmp_path, weights="1" * 64).load("42" * 32)
    assert got is not None and float(got.min()) == float(got.max()) in (1.0, 2.0, 3.0)
    assert not list(tmp_path.rglob("*.tmp"))


def test_hits_are_read_misses_encoded_once_and_stored(tmp_path):
    cache = _cache(tmp_path, size=32, dtype=torch.float32)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    calls = []

    def encode(pixels, hw):
        calls.append(len(pixels))
        assert pixels.shape[1:] == (3, 32, 32) and hw.tolist()[0] == [21, 32]
        return pixels.float().mean(dim=1, keepdim=True).expand(-1, 2, -1, -1) + 0.5

    embed = CachedEmbeddings(encode, cache, torch.device("cpu"))
    cold = embed(collate_lookups([lookup(cache, im, 32) for im in images[:2]]))
    assert calls == [2] and (embed.hits, embed.misses) == (0, 2) and len(cache) == 2
    warm = embed(collate_lookups([lookup(cache, im, 32) for im in (images[1], images[2], images[0])]))
    assert calls == [2, 1] and (embed.hits, embed.misses) == (2, 3)
    assert torch.equal(warm[0], cold[1]) and torch.equal(warm[2], cold[0]) and warm.shape == (3, 2, 32, 32)


def test_weights_and_file_hash(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    m = torch.nn.BatchNorm2d(3)
    before = weights_sha256(m.state_dict())
    assert weights_sha256(m.state_dict()) == before
    m.running_mean += 1  # statistics are part of what the encoder computes
    assert weights_sha256(m.state_dict()) != before
