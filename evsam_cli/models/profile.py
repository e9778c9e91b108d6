"""Counting parameters and MACs of zoo models (measured, not looked up).

MACs are counted with ``torch.utils.flop_counter`` on the meta device: the model is traced with
shape-only tensors, so counting ViT-H costs milliseconds instead of a real 3-TFLOP forward.
Like the paper, MACs are those of the image encoder at the model's input size (the prompt
encoder and mask decoder add about 1.8 GMACs per prompt); parameters are the whole model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .zoo import get_spec


@dataclass(frozen=True)
class ModelProfile:
    name: str
    input_size: int
    params: int
    encoder_params: int
    encoder_macs: int
    decoder_macs_per_prompt: int


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def profile_model(name: str) -> ModelProfile:
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.build().eval()
        size = model.input_size
        x = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            embedding = model.image_encoder(x)
        encoder_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.decode(embedding.detach(), boxes=torch.empty(1, 4))
        decoder_flops = counter.get_total_flops()
    return ModelProfile(
        name=spec.name,
        input_size=size,
        params=count_params(model),
        encoder_params=count_params(model.image_encoder),
        encoder_macs=encoder_flops // 2,
        decoder_macs_per_prompt=decoder_flops // 2,
    )
