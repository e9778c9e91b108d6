"""EfficientViT "large" backbones (the L and XL families used by EfficientViT-SAM).

A backbone is a list of stages. Stage 0 is a stride-2 stem conv plus ``depths[0]`` local blocks;
every later stage starts with a stride-2 downsampling block (no shortcut) followed by
``depths[i]`` residual blocks of the stage's kind: ``"res"``, ``"fmb"`` (fused MBConv), ``"mb"``
(MBConv) or ``"att"`` (EfficientViT block with lite multi-scale attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import (
    ConvNormAct,
    EfficientViTBlock,
    FusedMBConv,
    GELUTanh,
    LocalBlock,
    MBConv,
    OpSequential,
    ResBlock,
    Residual,
)

LOCAL_BLOCKS: dict[str, type[LocalBlock]] = {"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}


@dataclass(frozen=True)
class BackboneConfig:
    """Literal description of one backbone variant.

    ``blocks[i]`` is the block kind of stage i; an attention stage is written ``"att"`` (5x5
    aggregation) or ``"att@3"`` (3x3 aggregation, used by the XL models).
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    blocks: tuple[str, ...]
    expand_ratios: tuple[float, ...]
    fewer_norm: tuple[bool, ...]
    head_dim: int = 32

    def __post_init__(self) -> None:
        n = len(self.widths)
        for name in ("depths", "blocks", "expand_ratios", "fewer_norm"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BackboneConfig.{name} must have {n} entries like widths")
        for kind in self.blocks:
            if kind not in LOCAL_BLOCKS and kind not in ("att", "att@3"):
                raise ValueError(f"unknown block kind {kind!r}")


def _local_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    *,
    stride: int,
    expand_ratio: float,
    fewer_norm: bool,
    act_layer: type[nn.Module],
) -> nn.Module:
    return LOCAL_BLOCKS[kind](
        in_channels,
        out_channels,
        stride=stride,
        expand_ratio=expand_ratio,
        act_layer=act_layer,
        fewer_norm=fewer_norm,
    )


class EfficientViTBackbone(nn.Module):
    """Returns the feature maps of every stage, ``stage0`` (stride 2) ... ``stageN`` (stride 2^(N+1))."""

    def __init__(
        self, config: BackboneConfig, *, in_channels: int = 3, act_layer: type[nn.Module] = GELUTanh
    ):
        super().__init__()
        c = config
        self.widths = list(c.widths)

        stem: list[nn.Module] = [ConvNormAct(in_channels, c.widths[0], 3, stride=2, act_layer=act_layer)]
        for _ in range(c.depths[0]):
            block = _local_block(
                c.blocks[0],
                c.widths[0],
                c.widths[0],
                stride=1,
                expand_ratio=c.expand_ratios[0],
                fewer_norm=c.fewer_norm[0],
                act_layer=act_layer,
            )
            stem.append(Residual(block))
        stages: list[nn.Module] = [OpSequential(stem)]

        channels = c.widths[0]
        for i in range(1, len(c.widths)):
            kind, width = c.blocks[i], c.widths[i]
            is_attention = kind.startswith("att")
            # Downsampling: a local block with 4x the stage's expansion (MBConv for attention stages).
            down = _local_block(
                kind if not is_attention else "mb",
                channels,
                width,
                stride=2,
                expand_ratio=c.expand_ratios[i] * 4,
                fewer_norm=c.fewer_norm[i],
                act_layer=act_layer,
            )
            ops: list[nn.Module] = [Residual(down, identity=False)]
            channels = width
            for _ in range(c.depths[i]):
                if is_attention:
                    ops.append(
                        EfficientViTBlock(
                            channels,
                            head_dim=c.head_dim,
                            expand_ratio=c.expand_ratios[i],
                            scales=(3,) if kind == "att@3" else (5,),
                            act_layer=act_layer,
                        )
                    )
                else:
                    block = _local_block(
                        kind,
                        channels,
                        channels,
                        stride=1,
                        expand_ratio=c.expand_ratios[i],
                        fewer_norm=c.fewer_norm[i],
                        act_layer=act_layer,
                    )
                    ops.append(Residual(block))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, S, S) -> {"stage0": (B, w0, S/2, S/2), ..., "stageN": (B, wN, S/2^(N+1), ...)}."""
        features: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[f"stage{i}"] = x
        return features


# The L family: five stages, attention in the last two.
L_BLOCKS = ("res", "fmb", "fmb", "mb", "att")
L_EXPAND = (1, 4, 4, 4, 6)
L_FEWER_NORM = (False, False, False, True, True)
# The XL family: six stages, 3x3 aggregation in the attention stages.
XL_BLOCKS = ("res", "fmb", "fmb", "fmb", "att@3", "att@3")
XL_EXPAND = (1, 4, 4, 4, 4, 6)
XL_FEWER_NORM = (False, False, False, False, True, True)

BACKBONES: dict[str, BackboneConfig] = {
    "l0": BackboneConfig((32, 64, 128, 256, 512), (1, 1, 1, 4, 4), L_BLOCKS, L_EXPAND, L_FEWER_NORM),
    "l1": BackboneConfig((32, 64, 128, 256, 512), (1, 1, 1, 6, 6), L_BLOCKS, L_EXPAND, L_FEWER_NORM),
    "l2": BackboneConfig((32, 64, 128, 256, 512), (1, 2, 2, 8, 8), L_BLOCKS, L_EXPAND, L_FEWER_NORM),
    "xl0": BackboneConfig(
        (32, 64, 128, 256, 512, 1024), (0, 1, 1, 2, 3, 3), XL_BLOCKS, XL_EXPAND, XL_FEWER_NORM
    ),
    "xl1": BackboneConfig(
        (32, 64, 128, 256, 512, 1024), (1, 2, 2, 4, 6, 6), XL_BLOCKS, XL_EXPAND, XL_FEWER_NORM
    ),
}
