"""The model zoo: literal variants, ``create_model`` and checkpoint loading/saving.

Checkpoint formats are handled here and nowhere else:

* mit-han-lab ``efficientvit_sam_*.pt``: a plain state dict, or one under ``"state_dict"``, in
  exactly our key layout.
* Meta ``sam_vit_*.pth``: ``image_encoder.*`` (ViT), ``prompt_encoder.*``, ``mask_decoder.*``;
  the ViT's ``mlp.lin1/lin2`` are renamed to timm's ``mlp.fc1/fc2``.
* evsam's own files: ``{"state_dict": ..., "evsam": {"model": name, ...}}`` in the official layout
  of the model's family, plus training state; ``module.`` (DDP) and ``_orig_mod.``
  (torch.compile) prefixes are stripped.

Loading is always strict: a file that does not fit raises ``CheckpointError`` naming the model,
the file and the first missing/unexpected/mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UnknownModelError
from .efficientvit import BACKBONES, EfficientViTBackbone
from .encoder import EfficientViTSamImageEncoder, SamNeck
from .sam import Sam, build_sam_head
from .teacher import build_sam_vit, meta_to_timm_key, timm_to_meta_key

EFFICIENTVIT_HUB = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/"
META_HUB = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "efficientvit-sam" or "sam"
    input_size: int
    build: Callable[[], Sam]
    filename: str  # the official release file
    url: str
    paper_params_m: float | None  # as reported by the EfficientViT-SAM paper (None: not reported)
    paper_macs_g: float | None
    aliases: tuple[str, ...] = ()


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.name] = spec
    for alias in (spec.name, *spec.aliases):
        _ALIASES[alias.lower()] = spec.name
    return spec


# ---------------------------------------------------------------------------- EfficientViT-SAM
def _efficientvit_sam(
    name: str,
    backbone: str,
    *,
    input_size: int,
    neck_features: tuple[str, ...],
    neck_channels: tuple[int, ...],
    head_depth: int,
    expand_ratio: float,
) -> Sam:
    encoder = EfficientViTSamImageEncoder(
        EfficientViTBackbone(BACKBONES[backbone]),
        SamNeck(
            in_features=neck_features,
            in_channels=neck_channels,
            head_width=256,
            head_depth=head_depth,
            expand_ratio=expand_ratio,
        ),
    )
    prompt_encoder, mask_decoder = build_sam_head(norm_eps=1e-6)
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        input_size=input_size,
        name=name,
        family="efficientvit-sam",
    )


def _l_variant(name: str, backbone: str, head_depth: int) -> Callable[[], Sam]:
    return lambda: _efficientvit_sam(
        name,
        backbone,
        input_size=512,
        neck_features=("stage4", "stage3", "stage2"),
        neck_channels=(512, 256, 128),
        head_depth=head_depth,
        expand_ratio=1,
    )


def _xl_variant(name: str, backbone: str, head_depth: int) -> Callable[[], Sam]:
    return lambda: _efficientvit_sam(
        name,
        backbone,
        input_size=1024,
        neck_features=("stage5", "stage4", "stage3"),
        neck_channels=(1024, 512, 256),
        head_depth=head_depth,
        expand_ratio=4,
    )


# Paper, Table 1: parameters (M) of the whole model, image-encoder MACs (G) at its input size.
for _name, _backbone, _depth, _size, _params, _macs in (
    ("efficientvit-sam-l0", "l0", 4, 512, 34.8, 35.0),
    ("efficientvit-sam-l1", "l1", 8, 512, 47.7, 49.0),
    ("efficientvit-sam-l2", "l2", 12, 512, 61.3, 69.0),
    ("efficientvit-sam-xl0", "xl0", 6, 1024, 117.0, 185.0),
    ("efficientvit-sam-xl1", "xl1", 12, 1024, 203.3, 322.0),
):
    _builder = (_l_variant if _size == 512 else _xl_variant)(_name, _backbone, _depth)
    _file = f"efficientvit_sam_{_backbone}.pt"
    register(
        ModelSpec(
            name=_name,
            family="efficientvit-sam",
            input_size=_size,
            build=_builder,
            filename=_file,
            url=EFFICIENTVIT_HUB + _file,
            paper_params_m=_params,
            paper_macs_g=_macs,
            aliases=(_backbone,),
        )
    )


# ---------------------------------------------------------------------------- SAM (Meta)
def _sam_vit(name: str, kind: str) -> Callable[[], Sam]:
    def build() -> Sam:
        prompt_encoder, mask_decoder = build_sam_head(norm_eps=1e-5)
        return Sam(
            image_encoder=build_sam_vit(kind),
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            input_size=1024,
            name=name,
            family="sam",
        )

    return build


for _kind, _file, _params, _macs in (
    ("vit_b", "sam_vit_b_01ec64.pth", None, None),
    ("vit_l", "sam_vit_l_0b3195.pth", None, None),
    ("vit_h", "sam_vit_h_4b8939.pth", 641.1, 2973.0),
):
    _name = "sam-" + _kind.replace("_", "-")
    register(
        ModelSpec(
            name=_name,
            family="sam",
            input_size=1024,
            build=_sam_vit(_name, _kind),
            filename=_file,
            url=META_HUB + _file,
            paper_params_m=_params,
            paper_macs_g=_macs,
            aliases=(_kind, _kind.replace("_", "-")),
        )
    )


# ---------------------------------------------------------------------------- public API
def list_models() -> list[str]:
    """Canonical names of every model in the zoo, EfficientViT-SAM first."""
    return list(_MODELS)


def resolve_name(name: str) -> str:
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_ALIASES))
        raise UnknownModelError(f"unknown model {name!r}; known names: {known}") from None


def get_spec(name: str) -> ModelSpec:
    return _MODELS[resolve_name(name)]


def hub_dir() -> Path:
    """Where downloaded official checkpoints live (``$EVSAM_HOME`` or ``~/.cache/evsam``)."""
    return Path(os.environ.get("EVSAM_HOME", Path.home() / ".cache" / "evsam")).expanduser()


def download_checkpoint(name: str, *, progress: bool = True) -> Path:
    """The official release file of ``name``: from the cache folder, else downloaded into it."""
    spec = get_spec(name)
    target = hub_dir() / spec.filename
    if target.is_file():
        return target
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
    path: str | os.PathLike[str], *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, evsam metadata or {}) from any supported checkpoint file.

    ``mmap=True`` maps the tensors instead of reading them (cheap when only names and shapes
    are checked); files in the legacy serialisation format are read normally.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
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


def guess_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """The zoo model whose parameter names and shapes ``state`` matches exactly, if any."""
    for name, spec in _MODELS.items():
        with torch.device("meta"):
            candidate = spec.build()
        expected = candidate.state_dict()
        layout = to_model_layout(candidate, dict(state))
        if expected.keys() == layout.keys() and all(
            tuple(layout[k].shape) == tuple(v.shape) for k, v in expected.items()
        ):
            return name
    return None


def load_checkpoint(model: Sam, checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint`` into ``model`` strictly; returns the evsam metadata of the file."""
    path = Path(checkpoint).expanduser()
    state, meta = read_state_dict(path)
    state = to_model_layout(model, state)
    problem = describe_mismatch(model, path, state)
    if problem is not None:
        saved = meta.get("model") or guess_model(state)
        if saved and saved != model.name:
            problem += f". The file looks like {saved}: pass --model {saved} / create_model({saved!r}, ...)"
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


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    input_size: int | None = None,
) -> Sam:
    """Build a zoo model, optionally load weights, move it to ``device`` and set eval mode.

    Args:
      name: a name from ``list_models()`` or an alias (``l0``, ``vit_h`` ...).
      checkpoint: None (random init), a file path, or ``"hub"`` (the official release file,
        downloaded to ``hub_dir()`` when there is a network).
      device: where the model lives.
      input_size: encoder input side other than the model's own (EfficientViT-SAM only, a
        multiple of 32: the neck resizes every scale to 64x64, so weights are unchanged).
        Used for training at a reduced size and for fast tests.
    """
    spec = get_spec(name)
    model = spec.build()
    if input_size is not None and input_size != model.input_size:
        if spec.family != "efficientvit-sam":
            raise ValueError(f"{spec.name} only runs at {model.input_size}x{model.input_size}")
        if input_size % 32 or input_size < 64:
            raise ValueError(f"input_size must be a multiple of 32 and at least 64, got {input_size}")
        model.input_size = int(input_size)
    if checkpoint is not None:
        path = download_checkpoint(spec.name) if str(checkpoint) == "hub" else Path(checkpoint)
        load_checkpoint(model, path)
    return model.to(device).eval()
