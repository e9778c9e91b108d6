"""Checkpoint files: reading, strict loading and writing. Formats are handled here and nowhere else:

* mit-han-lab ``efficientvit_sam_*.pt``: a plain state dict, or one under ``"state_dict"``, in
  exactly our key layout.
* Meta ``sam_vit_*.pth``: ``image_encoder.*`` (ViT), ``prompt_encoder.*``, ``mask_decoder.*``;
  the ViT's ``mlp.lin1/lin2`` are renamed to timm's ``mlp.fc1/fc2``.
* evsam's own files: ``{"state_dict": ..., "evsam": {"model": name, ...}}`` in the official layout
  of the model's family, plus training state; ``module.`` (DDP) and ``_orig_mod.``
  (torch.compile) prefixes are stripped.

Loading is always strict: a file that does not fit raises ``CheckpointError`` naming the model,
the file and the first missing/unexpected/mis-shaped keys.

Every file is read by ``load_file``, which unpickles with ``weights_only=True`` and nothing else:
a ``.pt``/``.pth`` is a pickle, and unpickling an untrusted one in full can run any code. Files
evsam writes therefore hold only tensors, numbers, strings, lists, tuples and dicts.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError
from .sam_vit import meta_to_timm_key, timm_to_meta_key

if TYPE_CHECKING:
    from .sam import Sam


def hub_dir() -> Path:
    """Where downloaded official checkpoints live (``$EVSAM_HOME`` or ``~/.cache/evsam``)."""
    return Path(os.environ.get("EVSAM_HOME", Path.home() / ".cache" / "evsam")).expanduser()


def download_checkpoint(name: str, *, progress: bool = True) -> Path:
    """The official release file of ``name``: from the cache folder, else downloaded into it."""
    from .zoo import get_spec

    spec = get_spec(name)
    target = hub_dir() / spec.filename
    if target.is_file():
        return target
    if spec.url is None:  # no direct address (e.g. a Google Drive folder)
        raise CheckpointError(
            f"{spec.filename} for {spec.name} cannot be downloaded automatically; get it from "
            f"{spec.source} and put it at {target} (or pass checkpoint=PATH)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        torch.hub.download_url_to_file(spec.url, str(tmp), progress=progress)
    except Exception as exc:  # any network failure: tell the user how to do it by hand
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not download {spec.filename} for {spec.name} ({type(exc).__name__}: {exc}); "
            f"download {spec.url} yourself and put it at {target} (or pass checkpoint=PATH)"
        ) from None
    os.replace(tmp, target)
    return target


REFUSED = "holds Python objects that are not weights, refused for safety"
FOREIGN = "not a PyTorch checkpoint"
TRUNCATED = "truncated"

# torch.save's legacy (non-zip) format opens with this number, pickled as a 10-byte long.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def load_file(
    path: str | os.PathLike[str],
    *,
    what: str = "checkpoint",
    allow: Sequence[type] = (),
    mmap: bool = False,
) -> Any:
    """The object in a ``torch.save`` file, unpickled with ``weights_only=True`` onto the CPU.

    Every checkpoint evsam reads goes through here. A file that is missing, not a PyTorch file,
    cut short, or that holds pickled objects other than tensors and plain containers raises
    ``CheckpointError("cannot read {what} {path}: {reason}")`` without unpickling any of it.

    Args:
      what: how the message names the file ("checkpoint", "training checkpoint" ...).
      allow: classes one third-party format needs beyond the safe default (each allowed only for
        this call, through ``torch.serialization.safe_globals``).
      mmap: map the tensors instead of reading them (zip-format files only).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"cannot read {what} {path}: {reason}")

    kind = _file_kind(path)
    if kind == "empty":
        raise fail(f"{TRUNCATED} (the file is empty)")
    if kind == "foreign":
        raise fail(FOREIGN)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):  # the central directory sits at the very end
            raise fail(TRUNCATED) from None
        if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            raise fail(f"{FOREIGN} (a zip archive without data.pkl)")
    # safe_globals (torch >= 2.5) widens the allowlist for this call only; without it the
    # extra classes are refused like any other.
    scope = getattr(torch.serialization, "safe_globals", None)
    try:
        with scope(list(allow)) if allow and scope is not None else nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except Exception as exc:  # classified below; anything else still names the file, on one line
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
            needed = re.search(r"GLOBAL ([\w.]+)", text)
            raise fail(REFUSED + (f" (it asks for {needed.group(1)})" if needed else "")) from None
        if isinstance(exc, EOFError) or "EOF" in text or "truncated" in text:
            raise fail(TRUNCATED) from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise fail(f"{type(exc).__name__}: {first}") from None


def _file_kind(path: Path) -> str:
    """ "zip" (torch.save's format), "legacy" (its pre-1.6 format), "empty" or "foreign"."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return "legacy"
    return "foreign"


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) wrappers from key names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key.replace("._orig_mod.", ".")] = value
    return out


def read_state_dict(
    path: str | os.PathLike[str], *, mmap: bool = False, what: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, evsam metadata or {}) from any supported checkpoint file.

    ``mmap=True`` maps the tensors instead of reading them (cheap when only names and shapes
    are checked); files in the legacy serialisation format are read normally. ``what`` names
    the file in error messages.
    """
    path = Path(path).expanduser()
    obj = load_file(path, what=what, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("evsam", {}) if isinstance(obj.get("evsam"), Mapping) else {}
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return _strip_prefixes(state), dict(meta)


def to_model_layout(model: Sam, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` renamed into ``model``'s own key layout (Meta's ViT names -> timm's)."""
    if model.family == "sam":
        return {meta_to_timm_key(k) if k.startswith("image_encoder.") else k: v for k, v in state.items()}
    return state


def describe_mismatch(model: Sam, path: Path, state: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``state`` fits ``model`` exactly, else a message naming the first bad keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {first(shapes)}")
    return f"checkpoint {path} does not fit model {model.name}: " + "; ".join(parts)


def load_checkpoint(model: Sam, checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint`` into ``model`` strictly; returns the evsam metadata of the file."""
    path = Path(checkpoint).expanduser()
    # Mapped, not read: the load copies each tensor into the model once, straight from the file.
    state, meta = read_state_dict(path, mmap=True)
    state = to_model_layout(model, state)
    problem = describe_mismatch(model, path, state)
    if problem is not None:
        from .zoo import guess_model

        saved = meta.get("model") or guess_model(state)
        if saved and saved != model.name:
            problem += f". The file looks like {saved}: build it with create_model({saved!r}, ...)"
        raise CheckpointError(problem)
    model.load_state_dict(state, strict=True)
    return meta


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in its family's official key layout (Meta's names for SAM ViTs)."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model, "family", "") == "sam":
        state = {timm_to_meta_key(k) if k.startswith("image_encoder.") else k: v for k, v in state.items()}
    return state


def save_weights(model: nn.Module, path: str | os.PathLike[str], **extra_meta: Any) -> Path:
    """Write ``{"state_dict", "evsam"}`` atomically (temporary name, then rename)."""
    from .. import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inner = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    meta = {
        "model": getattr(inner, "name", ""),
        "format": "evsam-weights",
        "version": __version__,
        **extra_meta,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": export_state_dict(model), "evsam": meta}, tmp)
    os.replace(tmp, path)
    return path
