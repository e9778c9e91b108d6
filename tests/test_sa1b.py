"""SA-1B reader: folder vs tar shards, rank/worker splits, validation slice, corrupt files, resume."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from evsam_cli.data.sa1b import BatchStream, Sa1bStream, collate_stack, decode_mask, open_sa1b
from evsam_cli.data.synthetic import write_sa1b
from evsam_cli.errors import DataError, SettingError

N = 10


def _ids_transform(record, rng):
    # Cheap stand-in for a training transform: keeps the id, a pixel checksum and one random draw.
    return {
        "image_id": record.image_id,
        "checksum": torch.tensor(int(record.image.astype(np.int64).sum())),
        "draw": torch.tensor(float(rng.random())),
    }


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    write_sa1b(root / "pairs", num_images=N, image_size=48, seed=3)
    write_sa1b(root / "tars", num_images=N, image_size=48, shards=3, seed=3)
    return root


def _stream(source, *, rank=0, world=1, workers=0, batch=2, seed=0):
    ds = Sa1bStream(
        source,
        transform=_ids_transform,
        collate=collate_stack,
        batch_size=batch,
        seed=seed,
        rank=rank,
        world_size=world,
        num_workers=workers,
    )
    return BatchStream(ds, num_workers=workers)


def _epoch_samples(stream, *, epoch=0):
    """(image_id, checksum) of every sample of one epoch, in the order batches arrive."""
    out = []
    while True:
        batch = next(stream)
        if stream.epoch != epoch:
            return out, batch
        out += list(zip(batch["image_id"], batch["checksum"].tolist(), strict=True))


def _one_epoch(stream):
    out = []
    stream._start_epoch()
    for batch in stream._iter:
        if not batch["_empty"]:
            out += list(zip(batch["image_id"], batch["checksum"].tolist(), strict=True))
    return out


def test_folder_and_tar_shards_give_the_same_samples(datasets):
    pairs = open_sa1b(datasets / "pairs", val_images=0)
    tars = open_sa1b(datasets / "tars", val_images=0)
    assert not pairs.is_tar and tars.is_tar and len(tars.train_units) == 3
    a = sorted(_one_epoch(_stream(pairs)))
    b = sorted(_one_epoch(_stream(tars)))
    assert a == b
    assert [i for i, _ in a] == list(range(1, N + 1))
    # Tar shards are streamed in place: nothing was unpacked next to them.
    assert sorted(p.suffix for p in (datasets / "tars").iterdir()) == [".tar"] * 3


@pytest.mark.parametrize("kind", ["pairs", "tars"])
def test_ranks_and_workers_split_without_overlap(datasets, kind):
    source = open_sa1b(datasets / kind, val_images=2)
    val_ids = [r.image_id for r in source.validation_records()]
    assert len(val_ids) == 2
    seen = []
    for rank in range(2):
        part = [i for i, _ in _one_epoch(_stream(source, rank=rank, world=2, workers=2, batch=1))]
        assert part, f"rank {rank} got nothing"
        seen += part
    assert len(seen) == len(set(seen)) == N - 2  # disjoint, exhaustive
    assert not set(seen) & set(val_ids)  # the held-out slice never trains
    # Deterministic slice: the same images every time the data is opened.
    assert [r.image_id for r in open_sa1b(datasets / kind, val_images=2).validation_records()] == val_ids


def test_fewer_shards_than_workers_split_by_sample(datasets):
    source = open_sa1b(datasets / "tars", val_images=0)  # 3 shards, 2 ranks x 2 workers = 4
    seen = []
    for rank in range(2):
        seen += [i for i, _ in _one_epoch(_stream(source, rank=rank, world=2, workers=2, batch=1))]
    assert sorted(seen) == list(range(1, N + 1))


def test_epochs_reshuffle_and_augmentation_rng_is_per_image(datasets):
    source = open_sa1b(datasets / "pairs", val_images=0)
    stream = _stream(source, batch=1)
    first, pending = _epoch_samples(stream, epoch=0)
    second, _ = _epoch_samples(stream, epoch=1)
    second = [(pending["image_id"][0], int(pending["checksum"][0])), *second]
    assert sorted(first) == sorted(second) and first != second
    # rng depends on (seed, epoch, image id) only, not on the worker layout
    draws = {}
    for workers in (0, 2):
        s = _stream(source, workers=workers, batch=1)
        s._start_epoch()
        draws[workers] = {b["image_id"][0]: float(b["draw"][0]) for b in s._iter}
    assert draws[0] == draws[2]


def test_resume_continues_with_the_exact_batch_order(datasets):
    source = open_sa1b(datasets / "tars", val_images=1)
    full = _stream(source, workers=2, batch=2)
    reference = [tuple(next(full)["image_id"]) for _ in range(9)]  # crosses into the second epoch
    for cut in (1, 3, 5):
        part = _stream(source, workers=2, batch=2)
        got = [tuple(next(part)["image_id"]) for _ in range(cut)]
        state = part.state_dict()
        resumed = _stream(source, workers=2, batch=2)
        resumed.load_state_dict(state)
        got += [tuple(next(resumed)["image_id"]) for _ in range(9 - cut)]
        assert got == reference, f"cut after {cut} batches"


def test_corrupt_image_and_json_are_skipped_and_counted(tmp_path):
    write_sa1b(tmp_path, num_images=5, image_size=40, seed=1)
    (tmp_path / "sa_2.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "sa_4.json").write_text("{ truncated")
    (tmp_path / "sa_9.jpg").write_bytes((tmp_path / "sa_1.jpg").read_bytes())  # no annotation file
    source = open_sa1b(tmp_path, val_images=0)
    assert source.missing == ("sa_9.jpg",)
    stream = _stream(source, batch=1)
    got, _ = _epoch_samples(stream)
    assert sorted(i for i, _ in got) == [1, 3, 5]
    assert len(stream.skipped) == 2
    assert any("sa_2.jpg" in s and "image" in s for s in stream.skipped)
    assert any("sa_4" in s and "JSON" in s for s in stream.skipped)


def test_truncated_tar_shard_keeps_what_it_can(tmp_path):
    write_sa1b(tmp_path, num_images=4, image_size=40, shards=1, seed=2)
    shard = tmp_path / "sa_000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    stream = _stream(open_sa1b(tmp_path), batch=1)
    got, _ = _epoch_samples(stream)
    assert 1 <= len(got) < 4
    assert any("truncated" in s or "missing" in s for s in stream.skipped)


def test_no_images_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no SA-1B images"):
        open_sa1b(tmp_path)
    with pytest.raises(DataError, match="not found"):
        open_sa1b(tmp_path / "nope")
    write_sa1b(tmp_path, num_images=2, image_size=40)
    with pytest.raises(SettingError, match="val_images=2 holds out all 2 image"):
        open_sa1b(tmp_path, val_images=2)


def test_decode_mask_reads_every_segmentation_encoding():
    from pycocotools import mask as mask_utils

    m = np.zeros((6, 5), dtype=bool)
    m[1:4, 2:5] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    compressed = {"size": [6, 5], "counts": rle["counts"].decode("ascii")}
    flat = m.T.reshape(-1).astype(int)
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    uncompressed = {"size": [6, 5], "counts": runs}
    polygon = [[2, 1, 5, 1, 5, 4, 2, 4]]
    assert np.array_equal(decode_mask(compressed, 6, 5), m)
    assert np.array_equal(decode_mask(uncompressed, 6, 5), m)
    assert decode_mask(polygon, 6, 5)[2, 3]


def test_tar_members_in_any_order_are_paired(tmp_path):
    write_sa1b(tmp_path / "src", num_images=3, image_size=40, seed=5)
    with tarfile.open(tmp_path / "sa_000001.tar", "w") as tar:
        names = sorted((tmp_path / "src").iterdir(), key=lambda p: (p.suffix, p.name))  # all jpgs first
        for p in names:
            info = tarfile.TarInfo(f"./{p.name}")
            data = p.read_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = _one_epoch(_stream(open_sa1b(tmp_path / "sa_000001.tar"), batch=1))
    assert sorted(i for i, _ in got) == [1, 2, 3]


@pytest.mark.parametrize("kind", ["pairs", "tars"])
@pytest.mark.parametrize("images, held_out", [(1, 0), (2, 1), (4, 1), (12, 1), (40, 4), (400, 16)])
def test_default_validation_slice_leaves_images_to_train_on(tmp_path, kind, images, held_out):
    from evsam_cli.data.sa1b import auto_val_images

    assert auto_val_images(images) == held_out
    if images > 12:
        return  # the rule alone; writing that many images is slow
    write_sa1b(tmp_path, num_images=images, image_size=32, shards=1 if kind == "tars" else 0, seed=3)
    source = open_sa1b(tmp_path, val_images=None)
    assert source.val_images == held_out
    assert len(list(source.validation_records())) == held_out


def test_a_single_shard_cannot_be_held_out_whole(tmp_path):
    write_sa1b(tmp_path, num_images=3, image_size=32, shards=1, seed=3)
    with pytest.raises(SettingError, match="val_images=3 holds out all 3 image"):
        open_sa1b(tmp_path, val_images=3)
    assert open_sa1b(tmp_path, val_images=2).val_images == 2
