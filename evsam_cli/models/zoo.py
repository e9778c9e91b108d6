"""The model zoo: one literal spec per variant, ``create_model``.

Checkpoint files are read and written in ``checkpoints.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnknownModelError
from .checkpoints import download_checkpoint, load_checkpoint, to_model_layout
from .efficientvit import BACKBONES, EfficientViTBackbone
from .encoder import EfficientViTSamImageEncoder, SamNeck
from .sam import PROMPT_SIZE, Sam, build_sam_head
from .sam_vit import build_sam_vit
from .tiny_vit import build_tiny_vit_sam

EFFICIENTVIT_HUB = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/"
META_HUB = "https://dl.fbaipublicfiles.com/segment_anything/"
MOBILE_SAM_URL = "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt"
# LiteMedSAM's weights are shared from a Google Drive folder (linked from the LiteMedSAM branch
# of bowang-lab/MedSAM), which has no stable direct-download address.
LITE_MEDSAM_SOURCE = (
    "the MedSAM LiteMedSAM release: https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM "
    "(checkpoint folder https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN)"
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "efficientvit-sam", "sam" or "tiny-vit-sam" (decides the checkpoint key layout)
    input_size: int
    build: Callable[[], Sam]
    filename: str  # the official release file
    url: str | None  # direct download address; None: fetched by hand from ``source``
    paper_params_m: float | None  # as reported by the EfficientViT-SAM paper (None: not reported)
    paper_macs_g: float | None
    aliases: tuple[str, ...] = ()
    source: str = ""  # where the official file comes from, in words (defaults to ``url``)
    licence: str = ""


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.name] = spec
    for alias in (spec.name, *spec.aliases):
        _ALIASES[alias.lower()] = spec.name
    return spec


def _with_sam_head(
    image_encoder: nn.Module,
    *,
    name: str,
    family: str,
    input_size: int,
    norm_eps: float,
    prompt_size: int = PROMPT_SIZE,
    preprocessing: str = "sam",
) -> Sam:
    """``image_encoder`` with SAM's released prompt encoder and mask decoder (``build_sam_head``)."""
    prompt_encoder, mask_decoder = build_sam_head(norm_eps=norm_eps, prompt_size=prompt_size)
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        input_size=input_size,
        name=name,
        family=family,
        prompt_size=prompt_size,
        preprocessing=preprocessing,
    )


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
    return _with_sam_head(encoder, name=name, family="efficientvit-sam", input_size=input_size, norm_eps=1e-6)


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
        return _with_sam_head(build_sam_vit(kind), name=name, family="sam", input_size=1024, norm_eps=1e-5)

    return build


_sam_vits: tuple[tuple[str, str, float | None, float | None], ...] = (
    ("vit_b", "sam_vit_b_01ec64.pth", None, None),
    ("vit_l", "sam_vit_l_0b3195.pth", None, None),
    ("vit_h", "sam_vit_h_4b8939.pth", 641.1, 2973.0),
)
for _kind, _file, _vit_params, _vit_macs in _sam_vits:
    _name = "sam-" + _kind.replace("_", "-")
    register(
        ModelSpec(
            name=_name,
            family="sam",
            input_size=1024,
            build=_sam_vit(_name, _kind),
            filename=_file,
            url=META_HUB + _file,
            paper_params_m=_vit_params,
            paper_macs_g=_vit_macs,
            aliases=(_kind, _kind.replace("_", "-")),
        )
    )


# ---------------------------------------------------------------------------- TinyViT SAMs
def _tiny_vit_sam(
    name: str,
    *,
    input_size: int,
    patch_kernel_size: int,
    patch_stride: int,
    num_classes: int,
    preprocessing: str,
) -> Callable[[], Sam]:
    def build() -> Sam:
        encoder = build_tiny_vit_sam(
            patch_kernel_size=patch_kernel_size, patch_stride=patch_stride, num_classes=num_classes
        )
        # Both releases build SAM's head with Meta's defaults (LayerNorm eps 1e-5); the prompt
        # frame is the encoder's input frame.
        return _with_sam_head(
            encoder,
            name=name,
            family="tiny-vit-sam",
            input_size=input_size,
            norm_eps=1e-5,
            prompt_size=input_size,
            preprocessing=preprocessing,
        )

    return build


register(
    ModelSpec(
        name="mobile-sam",
        family="tiny-vit-sam",
        input_size=1024,
        # MobileSAM's release keeps TinyViT's unused ImageNet classifier (1000 classes).
        build=_tiny_vit_sam(
            "mobile-sam",
            input_size=1024,
            patch_kernel_size=3,
            patch_stride=2,
            num_classes=1000,
            preprocessing="sam",
        ),
        filename="mobile_sam.pt",
        url=MOBILE_SAM_URL,
        paper_params_m=None,
        paper_macs_g=None,
        aliases=("mobile_sam", "mobilesam", "vit_t"),
        source="the MobileSAM repository (ChaoningZhang/MobileSAM, weights/mobile_sam.pt)",
        licence="Apache-2.0",
    )
)
register(
    ModelSpec(
        name="lite-medsam",
        family="tiny-vit-sam",
        input_size=256,
        build=_tiny_vit_sam(
            "lite-medsam",
            input_size=256,
            patch_kernel_size=1,
            patch_stride=1,
            num_classes=0,
            preprocessing="minmax-area",
        ),
        filename="lite_medsam.pth",
        url=None,
        paper_params_m=None,
        paper_macs_g=None,
        aliases=("lite_medsam", "litemedsam", "medsam-lite"),
        source=LITE_MEDSAM_SOURCE,
        licence="Apache-2.0",
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


class _WithoutInit(TorchFunctionMode):
    """Module construction with the ``torch.nn.init`` functions skipped (they return their tensor
    as allocated): for a model whose weights are loaded next, where drawing random weights first
    is most of the build's time. A torch-function mode, so it holds for this thread only."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


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
        downloaded to ``hub_dir()`` when there is a network; files without a direct address,
        such as LiteMedSAM's, are expected there under ``spec.filename``).
      device: where the model lives.
      input_size: encoder input side other than the model's own (EfficientViT-SAM only, a
        multiple of 32: the neck resizes every scale to 64x64, so weights are unchanged).
        Used for training at a reduced size and for fast tests.
    """
    spec = get_spec(name)
    if checkpoint is None:
        model = spec.build()
    else:  # every parameter and persistent buffer is then loaded strictly: no random init first
        with _WithoutInit():
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
