"""The EfficientViT-SAM image encoder: EfficientViT backbone -> SAM neck -> LayerNorm2d.

The neck projects three backbone stages to ``head_width`` channels, resizes each to 64x64
(bicubic), sums them, refines the sum with fused-MBConv blocks and projects to SAM's 256-channel
embedding, so SAM's prompt encoder and mask decoder apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .efficientvit import EfficientViTBackbone
from .layers import (
    NORM_EPS,
    ConvNormAct,
    FusedMBConv,
    GELUTanh,
    LayerNorm2d,
    OpSequential,
    Residual,
    Upsample,
)

EMBED_DIM = 256
EMBED_SIZE = 64


class SamNeck(nn.Module):
    """Fuses multi-scale backbone features into one (B, out_dim, 64, 64) map.

    Attribute names (``input_ops``, ``middle``, ``output_ops``) follow the official key layout.
    """

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        head_width: int,
        head_depth: int,
        expand_ratio: float,
        out_dim: int = EMBED_DIM,
        embed_size: int = EMBED_SIZE,
        act_layer: type[nn.Module] = GELUTanh,
    ) -> None:
        super().__init__()
        if len(in_features) != len(in_channels):
            raise ValueError("in_features and in_channels must have the same length")
        self.in_features = list(in_features)
        self.input_ops = nn.ModuleList(
            OpSequential([ConvNormAct(c, head_width, 1), Upsample(embed_size)]) for c in in_channels
        )
        self.middle = OpSequential(
            [
                Residual(FusedMBConv(head_width, head_width, expand_ratio=expand_ratio, act_layer=act_layer))
                for _ in range(head_depth)
            ]
        )
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvNormAct(head_width, out_dim, 1, bias=True, norm=False)])]
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = None
        for name, op in zip(self.in_features, self.input_ops, strict=True):
            y = op(features[name])
            x = y if x is None else x + y
        assert x is not None
        return self.output_ops[0](self.middle(x))


class EfficientViTSamImageEncoder(nn.Module):
    """(B, 3, S, S) normalised, padded images -> (B, 256, 64, 64) SAM image embeddings."""

    def __init__(self, backbone: EfficientViTBackbone, neck: SamNeck) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.norm = LayerNorm2d(EMBED_DIM, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.neck(self.backbone(x)))
