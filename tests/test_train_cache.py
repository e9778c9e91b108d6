"""Teacher cache: fp16 round trip, keys, unreadable files, concurrent writers."""

from __future__ import annotations

import threading

import numpy as np
import torch

from evsam_cli.train.teacher_cache import TeacherCache, file_sha256


def test_round_trip_in_float16_keyed_by_checkpoint(tmp_path):
    a = TeacherCache(tmp_path, teacher="vit_h", checkpoint_hash="ab" * 32)
    b = TeacherCache(tmp_path, teacher="vit_h", checkpoint_hash="cd" * 32)
    emb = torch.randn(256, 64, 64)
    assert a.load(1234) is None
    a.store(1234, emb)
    got = a.load(1234)
    assert got.dtype == torch.float16 and torch.equal(got, emb.half())
    assert a.path(1234).relative_to(tmp_path).parts == ("vit_h-" + "ab" * 8, "234", "1234.npy")
    assert b.load(1234) is None  # another teacher file never sees these embeddings
    assert len(a) == 1 and not list(tmp_path.rglob("*.tmp"))


def test_unreadable_or_wrong_shape_counts_as_a_miss(tmp_path):
    cache = TeacherCache(tmp_path, teacher="vit_b", checkpoint_hash="0" * 64)
    cache.path(7).parent.mkdir(parents=True)
    cache.path(7).write_bytes(b"\x93NUMPY truncated")
    assert cache.load(7) is None
    cache.path(8).parent.mkdir(parents=True)
    np.save(cache.path(8), np.zeros((256, 64, 63), dtype=np.float16))
    assert cache.load(8) is None


def _writer(root, value):
    cache = TeacherCache(root, teacher="vit_b", checkpoint_hash="1" * 64)
    for _ in range(5):
        cache.store(42, torch.full((256, 64, 64), float(value)))


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    # Threads stand in for ranks: each write goes to its own temporary name and is renamed, so
    # the reader sees one writer's whole file whatever the interleaving.
    threads = [threading.Thread(target=_writer, args=(tmp_path, v)) for v in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = TeacherCache(tmp_path, teacher="vit_b", checkpoint_hash="1" * 64).load(42)
    assert got is not None and float(got.min()) == float(got.max()) in (1.0, 2.0, 3.0)
    assert not list(tmp_path.rglob("*.tmp"))


def test_file_hash(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
