"""SA-1B reader: a folder of ``sa_*.jpg`` + ``sa_*.json`` pairs, or SA-1B's ``.tar`` shards read in place.

The data is split into *units*: one image/annotation pair in a folder, or one ``.tar`` shard
(streamed with ``tarfile``'s ``r|`` mode, never unpacked). Every epoch the training units are
shuffled with ``(seed, epoch)``, then dealt to the ``world_size x num_workers`` *global workers*
(rank-major): unit ``i`` goes to global worker ``i % G``. When there are fewer units than global
workers (a few big shards), every worker streams all units and keeps sample ``j % G == g``
instead. Either way no sample is read by two workers and none is dropped.

Each worker builds whole batches and tags them with its *logical* worker id and its raw stream
position (samples read so far, corrupt ones included). ``BatchStream`` records the position of
every batch the training loop actually consumed, so a resumed run skips exactly what was used
and, by rotating which DataLoader worker plays which logical worker, receives the remaining
batches in the same order as an uninterrupted run.

The held-out validation slice is deterministic: the last ``val_images`` pairs of a folder (in
name order), or the first ``val_images`` samples of the last shard. Training never sees them.
Without a ``val_images`` (``None``) the slice is ``auto_val_images`` of the images it is taken
from (the folder's, or the last shard's), so that a small dataset still has images to train on.

A corrupt image or annotation file is skipped and reported (``skipped`` names), never fatal.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError, SettingError
from .images import open_image, pil_to_rgb_uint8

log = logging.getLogger("evsam.data")

_NUMBER = re.compile(r"(\d+)")


def _natural_key(path: Path) -> tuple[Any, ...]:
    """``sa_2`` before ``sa_10``."""
    return tuple(int(p) if p.isdigit() else p for p in _NUMBER.split(path.name))


@dataclass(frozen=True)
class Sa1bRecord:
    """One decoded SA-1B sample.

    Attributes:
      image_id: the ``image.image_id`` of the JSON file.
      name: where it came from (``sa_1.jpg`` or ``sa_000000.tar:./sa_1.jpg``), for messages.
      image: HxWx3 uint8 RGB.
      annotations: the JSON's ``annotations`` list (segmentation still RLE-encoded).
    """

    image_id: int
    name: str
    image: np.ndarray
    annotations: list[dict[str, Any]]


@dataclass(frozen=True)
class _Raw:
    """Undecoded bytes of a pair."""

    name: str
    jpg: bytes
    js: bytes


class CorruptSample(Exception):
    """Internal: a sample that cannot be decoded (caught and counted by the reader)."""


def decode_record(raw: _Raw) -> Sa1bRecord:
    """Raw bytes -> ``Sa1bRecord``; ``CorruptSample`` when the image or the JSON is unreadable."""
    try:
        meta = json.loads(raw.js)
        image_id = int(meta["image"]["image_id"])
        annotations = list(meta["annotations"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptSample(f"{raw.name}: bad annotation JSON ({type(exc).__name__}: {exc})") from None
    try:
        with open_image(io.BytesIO(raw.jpg)) as img:
            img.load()
            image = pil_to_rgb_uint8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptSample(f"{raw.name}: cannot decode image ({type(exc).__name__})") from None
    return Sa1bRecord(image_id=image_id, name=raw.name, image=image, annotations=annotations)


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (compressed RLE, uncompressed RLE or polygons) -> (H, W) bool mask."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------- units
class SampleUnit(Protocol):
    """What a source is made of: something that reads raw samples (an SA-1B pair or shard, one
    COCO image); its first ``skip`` samples belong to the validation slice."""

    @property
    def path(self) -> Path: ...

    @property
    def skip(self) -> int: ...

    def read(self) -> Iterator[_Raw | str]: ...


@dataclass(frozen=True)
class Unit:
    """A tar shard, or one image (``path``) and its record; ``skip`` leading samples belong to validation.

    An image's record is the JSON file beside it (an SA-1B pair), or ``record``: SA-1B-shaped JSON
    bytes made from annotations kept elsewhere (``data.coco_train``).
    """

    path: Path
    is_tar: bool
    skip: int = 0
    record: bytes | None = None

    def read(self) -> Iterator[_Raw | str]:
        """Raw samples in stream order; a ``str`` is the name of something unreadable."""
        if self.is_tar:
            yield from _read_tar(self.path)
            return
        try:
            record = self.record if self.record is not None else self.path.with_suffix(".json").read_bytes()
            yield _Raw(self.path.name, self.path.read_bytes(), record)
        except OSError as exc:
            yield f"{self.path.name}: {exc.strerror or exc}"


def _read_tar(path: Path) -> Iterator[_Raw | str]:
    """Stream ``sa_*.jpg``/``sa_*.json`` members of a tar file, pairing them by name."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                stem, ext = os.path.splitext(base)
                if ext.lower() not in (".jpg", ".json"):
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                parts = pending.setdefault(stem, {})
                parts[ext.lower()] = data
                if len(parts) == 2:
                    del pending[stem]
                    yield _Raw(f"{path.name}:{stem}.jpg", parts[".jpg"], parts[".json"])
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield f"{path.name}: truncated or corrupt tar ({exc})"
    for stem in pending:
        yield f"{path.name}:{stem}: image or annotation file missing from the shard"


@dataclass(frozen=True)
class Sa1bSource:
    """The units of an SA-1B copy (or of a COCO-format set, ``coco_train.open_coco``), split into
    training units and the validation slice."""

    root: Path
    train_units: tuple[SampleUnit, ...]
    val_unit_list: tuple[SampleUnit, ...]
    val_images: int
    is_tar: bool
    missing: tuple[str, ...] = ()  # JPEGs without annotation file

    @property
    def num_units(self) -> int:
        return len(self.train_units)

    def validation_records(self) -> Iterator[Sa1bRecord | str]:
        """The held-out samples, decoded, in a fixed order (``str``: a skipped, corrupt one)."""
        left = self.val_images
        for unit in self.val_unit_list:
            for raw in unit.read():
                if left <= 0:
                    return
                left -= 1
                if isinstance(raw, str):
                    yield raw
                    continue
                try:
                    yield decode_record(raw)
                except CorruptSample as exc:
                    yield str(exc)


def auto_val_images(available: int) -> int:
    """The validation slice when none is asked for: a tenth of the ``available`` images, at most
    16, at least one when there are two or more, none when there is one (it is needed to train)."""
    return 0 if available < 2 else min(16, max(1, available // 10))


def check_val_images(val_images: int | None, available: int, where: str) -> int:
    """The validation slice to hold out of ``available`` images (all of them being the only
    training data): ``val_images``, or ``auto_val_images`` for ``None``. Raises ``SettingError``
    when nothing would be left to train on."""
    if val_images is None:
        return auto_val_images(available)
    if val_images < 0:
        raise SettingError(f"val_images cannot be negative (got {val_images})", "val_images")
    if val_images >= available:
        raise SettingError(
            f"val_images={val_images} holds out all {available} image(s) of {where}, leaving none to train "
            f"on; hold out at most {available - 1} (0: no validation), or leave val_images unset to hold "
            "out a tenth",
            "val_images",
        )
    return val_images


def open_sa1b(path: str | os.PathLike[str], *, val_images: int | None = 0) -> Sa1bSource:
    """Find SA-1B data at ``path``: a folder of pairs or of ``.tar`` shards, or one ``.tar`` file.

    ``val_images``: images held out for validation; ``None`` chooses ``auto_val_images``.
    Raises ``DataError`` when nothing usable is there, ``SettingError`` when the validation slice
    would take every training image.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"SA-1B data not found: {root}")
    if root.is_file():
        if not root.name.endswith(".tar"):
            raise DataError(f"{root} is neither a folder nor a .tar shard")
        tars = [root]
        jpgs: list[Path] = []
    else:
        tars = sorted(root.glob("*.tar"), key=_natural_key)
        jpgs = [] if tars else sorted(root.glob("*.jpg"), key=_natural_key)
    missing = tuple(p.name for p in jpgs if not p.with_suffix(".json").is_file())
    pairs = [p for p in jpgs if p.with_suffix(".json").is_file()]
    if not tars and not pairs:
        raise DataError(
            f"no SA-1B images found in {root}: expected sa_*.jpg + sa_*.json pairs or sa_*.tar shards"
        )
    if tars:
        units = [Unit(p, True) for p in tars]
        last = units[-1]
        if val_images is None or (val_images > 0 and len(units) == 1):
            # Only a lone shard is the whole training set; with several, the others still train.
            in_last = _count_tar_images(last.path, partial=True)
            if len(units) == 1:
                val_images = check_val_images(val_images, in_last, str(last.path))
            else:
                val_images = auto_val_images(in_last) if val_images is None else val_images
        elif val_images < 0:
            check_val_images(val_images, 1, str(root))
        if val_images:
            train = (*units[:-1], Unit(last.path, True, skip=val_images))
            val: tuple[Unit, ...] = (last,)
            log.info("validation: the first %d image(s) of %s held out", val_images, last.path.name)
        else:
            train, val = tuple(units), ()
    else:
        val_images = check_val_images(val_images, len(pairs), str(root))
        cut = len(pairs) - val_images
        train = tuple(Unit(p, False) for p in pairs[:cut])
        val = tuple(Unit(p, False) for p in pairs[cut:])
        if val_images:
            log.info("validation: %d of %d image(s) held out (the last by name)", val_images, len(pairs))
    return Sa1bSource(
        root=root,
        train_units=train,
        val_unit_list=val,
        val_images=val_images,
        is_tar=bool(tars),
        missing=missing,
    )


def _count_tar_images(path: Path, *, partial: bool = False) -> int:
    """Images in a shard, from its member headers (image data is skipped). A truncated or corrupt
    shard raises ``DataError``, or with ``partial`` counts the images before the damage (what
    training will read of it)."""
    count = 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                count += member.name.endswith(".jpg")
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not partial:
            raise DataError(f"cannot read shard {path}: {exc}") from None
    return count


def count_train_images(source: Any) -> int:
    """Training images of a source (for ``--epochs``): tar headers are read, image data is skipped."""
    if not getattr(source, "is_tar", False):
        return len(source.train_units)
    return sum(max(0, _count_tar_images(unit.path) - unit.skip) for unit in source.train_units)


# ---------------------------------------------------------------------------- streaming
Transform = Callable[[Sa1bRecord, np.random.Generator], dict[str, Any] | None]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]


class Sa1bStream(IterableDataset):
    """One epoch of training batches for this rank, split across DataLoader workers.

    ``transform(record, rng)`` turns a record into a sample dict (or ``None`` to skip it, e.g. an
    image without masks); ``rng`` is seeded by ``(seed, epoch, image_id)`` so augmentation does
    not depend on which worker runs it. ``collate`` builds a batch from ``batch_size`` samples.
    Every yielded batch also holds ``"_worker"``, ``"_position"`` and ``"_skipped"`` (names).
    """

    def __init__(
        self,
        source: Sa1bSource,
        *,
        transform: Transform,
        collate: Collate,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.transform = transform
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.shuffle = shuffle
        # [epoch, rotation, positions...] in shared memory: DataLoader workers that live across
        # epochs hold their own copy of this object, and read where to start from here.
        self._state = torch.zeros(2 + self.num_workers, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def rotation(self) -> int:
        return int(self._state[1])

    @property
    def positions(self) -> list[int]:
        return self._state[2:].tolist()

    def set_state(self, epoch: int, positions: list[int], rotation: int) -> None:
        """Start ``epoch`` with each logical worker past ``positions[k]`` raw samples.

        Takes effect at the next ``iter()``, in this process and in live DataLoader workers alike.
        """
        if len(positions) != self.num_workers:
            raise ValueError(f"{len(positions)} positions for {self.num_workers} workers")
        self._state.copy_(torch.tensor([epoch, rotation, *positions], dtype=torch.int64))

    def units_for_epoch(self, epoch: int) -> list[SampleUnit]:
        units = list(self.source.train_units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units

    def _raw_stream(self, worker: int, epoch: int) -> Iterator[_Raw | str]:
        """This logical worker's raw samples for ``epoch`` (held-out ones excluded)."""
        g = self.rank * self.num_workers + worker
        total = self.world_size * self.num_workers
        units = self.units_for_epoch(epoch)
        if len(units) >= total:
            for unit in units[g::total]:
                yield from _skip_leading(unit)
            return
        j = 0
        for unit in units:
            for raw in _skip_leading(unit):
                if j % total == g:
                    yield raw
                j += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"Sa1bStream built for {self.num_workers} workers runs in {info.num_workers}")
        state = self._state.tolist()  # one read: the epoch, rotation and positions belong together
        epoch, rotation, positions = state[0], state[1], state[2:]
        worker = (physical + rotation) % self.num_workers
        start = positions[worker]
        samples: list[dict[str, Any]] = []
        skipped: list[str] = []
        position = 0
        for raw in self._raw_stream(worker, epoch):
            position += 1
            if position <= start:
                continue  # consumed before the run was interrupted
            if isinstance(raw, str):
                skipped.append(raw)
                continue
            try:
                record = decode_record(raw)
            except CorruptSample as exc:
                skipped.append(str(exc))
                continue
            rng = np.random.default_rng([self.seed, epoch, record.image_id & 0x7FFFFFFF])
            sample = self.transform(record, rng)
            if sample is None:
                skipped.append(f"{record.name}: no usable masks")
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield self._batch(samples, worker, position, skipped)
                samples, skipped = [], []
        if samples:
            yield self._batch(samples, worker, position, skipped)
        elif skipped:
            yield {"_worker": worker, "_position": position, "_skipped": skipped, "_empty": True}

    def _batch(
        self, samples: list[dict[str, Any]], worker: int, position: int, skipped: list[str]
    ) -> dict[str, Any]:
        batch = self.collate(samples)
        batch.update(_worker=worker, _position=position, _skipped=skipped, _empty=False)
        return batch


def _skip_leading(unit: SampleUnit) -> Iterator[_Raw | str]:
    for i, raw in enumerate(unit.read()):
        if i >= unit.skip:
            yield raw


class BatchStream:
    """Endless batches over epochs for one rank, with a resumable position.

    ``state_dict()`` is everything needed to continue with the very next batch an uninterrupted
    run would have produced: the epoch, each logical worker's consumed position, and which worker
    comes next.
    """

    def __init__(self, dataset: Sa1bStream, *, num_workers: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.positions = [0] * dataset.num_workers
        self.next_worker = 0
        self.skipped: list[str] = []  # every corrupt sample met so far, once each
        self.images = 0
        self._iter: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None
        self._epoch_batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "positions": list(self.positions),
            "next_worker": self.next_worker,
            "skipped": list(self.skipped),
            "images": self.images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["positions"]) != self.dataset.num_workers:
            raise DataError(
                f"the checkpoint was written with {len(state['positions'])} data-loader workers; "
                f"resume with workers={len(state['positions'])}"
            ).naming("workers")
        self.epoch = int(state["epoch"])
        self.positions = list(state["positions"])
        self.next_worker = int(state["next_worker"])
        self.skipped = list(state["skipped"])
        self.images = int(state["images"])
        self._iter = None

    def _start_epoch(self) -> None:
        self.dataset.set_state(self.epoch, self.positions, self.next_worker)
        if self._loader is None:
            # Workers live across epochs (and resumes): on a small data set an epoch lasts a few
            # steps, and forking a process that holds a model and its optimizer every few steps
            # costs page-table copies and copy-on-write faults. They read each epoch's start from
            # the dataset's shared state when the next iter() resumes them.
            self._loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
            )
        self._iter = iter(self._loader)
        self._epoch_batches = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)  # type: ignore[arg-type]
            except StopIteration:
                empty_epochs = empty_epochs + 1 if self._epoch_batches == 0 else 0
                if empty_epochs > 1:  # a fresh epoch gave nothing either
                    raise DataError(
                        f"rank {self.dataset.rank} has no usable training images in {self.dataset.source.root} "
                        f"({len(self.skipped)} skipped)"
                    ) from None
                self.epoch += 1
                self.positions = [0] * len(self.positions)
                self.next_worker = 0
                self._iter = None
                continue
            worker = int(batch.pop("_worker"))
            self.positions[worker] = int(batch.pop("_position"))
            self.next_worker = (worker + 1) % len(self.positions)
            self.skipped.extend(s for s in batch.pop("_skipped") if s not in self.skipped)
            if batch.pop("_empty"):
                continue
            self._epoch_batches += 1
            self.images += len(batch["image_id"])
            return batch


def collate_stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors/arrays key by key; other values become lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        else:
            out[key] = values
    return out
