"""SAM's ViT image encoders (B, L, H), built from timm's ``samvit`` implementation.

These are the distillation teachers and the accuracy baseline. The timm module is used as is;
only ``forward`` is redirected to ``forward_features`` so that calling the encoder returns the
(B, 256, 64, 64) image embedding, like every other image encoder in the zoo.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn


@dataclass(frozen=True)
class SamViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


SAM_VITS: dict[str, SamViTConfig] = {
    "vit_b": SamViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamViTConfig(1280, 32, 16, (7, 15, 23, 31)),
}


class SamViTImageEncoder(VisionTransformerSAM):
    """timm's SAM ViT returning the neck output: (B, 3, 1024, 1024) -> (B, 256, 64, 64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def build_sam_vit(kind: str, img_size: int = 1024) -> SamViTImageEncoder:
    """``kind`` in vit_b / vit_l / vit_h; Meta's hyper-parameters (LayerNorm eps 1e-6, exact GELU)."""
    try:
        cfg = SAM_VITS[kind]
    except KeyError:
        raise ValueError(f"unknown SAM ViT {kind!r}; known: {', '.join(SAM_VITS)}") from None
    return SamViTImageEncoder(
        img_size=img_size,
        patch_size=16,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=14,
        use_rel_pos=True,
        mlp_ratio=4.0,
        qkv_bias=True,
        # timm annotates a layer type, but calls it as a factory (as its own SAM configs do)
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]
        act_layer=nn.GELU,
        neck_chans=256,
        num_classes=0,
    )


def meta_to_timm_key(key: str) -> str:
    """Meta's ``image_encoder.*`` names -> timm's (the MLP layers are ``fc1/fc2`` in timm)."""
    return key.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")


def timm_to_meta_key(key: str) -> str:
    return key.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")
