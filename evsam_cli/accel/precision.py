"""Reduced-precision inference copies of the image encoder and the mask decoder (bf16, fp16).

Applied to copies, from outside the model (as ``encoder.py`` does): the model's weights and
code stay float32 and unchanged. What stays in float32, and why (measurements in
docs/precision.md):

* Normalisation statistics: every LayerNorm computes its mean and variance in float32 and
  keeps float32 weights (``Float32Norm``; EfficientViT's ``LayerNorm2d`` already upcasts).
  BatchNorm is folded into the preceding convolution first, in float32, then cast.
* The linear-attention sums of EfficientViT's LiteMLA (``V K^T``, its normaliser ``1^T K^T Q``
  and the division): ``LiteMLA.attention`` computes them in float32 whatever its input dtype;
  in bf16 their sums over 1k-4k tokens lose the normaliser's precision.
* The neck's resizes (``MatmulResize`` computes in float32) and the encoder's final LayerNorm,
  whose output, the image embedding, is returned in float32.
* The prompt encoder (Fourier features of pixel coordinates: sines of arguments up to ~100,
  which bf16's 8-bit mantissa cannot resolve), and the mask upscaling and threshold
  (``SamPredictor`` upcasts the low-res logits before ``postprocess_binary``).

Everything else (convolutions, matmuls, activations, the decoder's transformer) runs in the
reduced dtype. On the CPU the encoder's convolutions run as single oneDNN calls with the
activation fused and the weight prepacked (``encoder.FusedConvAct``): bf16 convolutions run on the
AVX-512-bf16 / AMX units, and separate elementwise passes would eat most of the gain.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeviceError
from ..models.layers import ConvNormAct
from .encoder import FusedConvAct, _post_op, _replace_children_, fold_batchnorm_, use_matmul_resize_

if TYPE_CHECKING:
    from ..models.sam import Sam

DTYPES = ("fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags of native bf16 arithmetic (x86: AVX-512 BF16, AMX; Arm: BF16 extension).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


class PrecisionError(DeviceError):
    """A dtype this device cannot run (fp16 on a CPU, bf16 without bf16 instructions)."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 instruction-set flags this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def check_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device``; ``PrecisionError`` where it cannot run fast.

    bf16 on a CPU without bf16 instructions is an error rather than a silent fallback: oneDNN
    would emulate it, slower than float32 and less accurate, which is never what was asked.
    """
    if dtype not in TORCH_DTYPES:
        raise PrecisionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if dtype == "fp16" and device.type == "cpu":
        raise PrecisionError("fp16 needs a GPU (PyTorch has no fast fp16 CPU kernels): use bf16 or fp32")
    if dtype == "bf16" and device.type == "cpu" and not cpu_bf16_flags():
        raise PrecisionError(
            "bf16 on the CPU needs bf16 instructions (AVX-512 BF16 or AMX), which this CPU lacks: use fp32"
        )
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"{torch.cuda.get_device_name(device)} has no bf16 support: use fp16")
    return TORCH_DTYPES[dtype]


# ---------------------------------------------------------------------------- building blocks
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


class Float32Norm(nn.Module):
    """Runs ``norm`` (float32 weights) on a float32 copy of its input; the output is cast back
    to the input's dtype, or left float32 with ``keep_float32``."""

    def __init__(self, norm: nn.Module, *, keep_float32: bool = False) -> None:
        super().__init__()
        self.norm = norm.float()
        self.keep_float32 = keep_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x.float())
        return y if self.keep_float32 else y.to(x.dtype)


def _packed_conv(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, ConvNormAct) or module.norm is not None or _post_op(module.act) is None:
        return None
    return FusedConvAct(module.conv, module.act)


def _float32_norms_(module: nn.Module, final: nn.Module | None) -> None:
    """Wrap every norm of ``module`` in ``Float32Norm`` (``final`` keeps its float32 output)."""
    _replace_children_(
        module,
        lambda m: (
            Float32Norm(m, keep_float32=m is final)
            if isinstance(m, NORM_TYPES) and not isinstance(m, Float32Norm)
            else None
        ),
    )


def _last_norm(module: nn.Module) -> nn.Module | None:
    """The last norm registered in ``module``: the encoders' final norm (EfficientViT's
    ``norm``, the SAM ViT neck's last LayerNorm2d), whose output is the embedding."""
    norms = [m for m in module.modules() if isinstance(m, NORM_TYPES)]
    return norms[-1] if norms else None


class CastIO(nn.Module):
    """Feeds ``module`` its input in ``dtype`` (channels-last for 4-D inputs with
    ``channels_last``) and returns its output as contiguous float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, *, channels_last: bool = False) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float().contiguous()


# ---------------------------------------------------------------------------- copies
def reduced_encoder(encoder: nn.Module, dtype: str, *, device: torch.device | str | None = None) -> nn.Module:
    """An eval-mode inference copy of ``encoder`` running in ``dtype`` ("bf16", "fp16"; "fp32"
    returns ``optimize_encoder``'s copy): BatchNorm folded in float32 first, resizes as float32
    matmuls, norms in float32, convolutions prepacked for oneDNN on the CPU, channels-last.
    Takes and returns float32 tensors; the model is untouched."""
    if device is None:
        device = next(encoder.parameters()).device
    device = torch.device(device)
    torch_dtype = check_dtype(dtype, device)
    if dtype == "fp32":
        from .encoder import optimize_encoder

        return optimize_encoder(encoder)
    fast = copy.deepcopy(encoder).eval().to(device)
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm_(fast)
    use_matmul_resize_(fast)
    final = _last_norm(fast)
    fast.to(torch_dtype)
    _float32_norms_(fast, final)
    if device.type == "cpu":
        _replace_children_(fast, _packed_conv)
    convs = any(isinstance(m, nn.Conv2d) for m in fast.modules())
    return CastIO(
        fast.to(memory_format=torch.channels_last) if convs else fast, torch_dtype, channels_last=convs
    )


class ReducedDecoder(nn.Module):
    """``MaskDecoder`` in a reduced dtype: its inputs are cast on the way in, the low-res
    logits and IoU predictions come back float32. LayerNorms run in float32."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder = decoder
        self.dtype = dtype

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cast = lambda t: t.to(self.dtype)  # noqa: E731
        masks, iou = self.decoder(
            image_embeddings=cast(image_embeddings),
            image_pe=cast(image_pe),
            sparse_prompt_embeddings=cast(sparse_prompt_embeddings),
            dense_prompt_embeddings=cast(dense_prompt_embeddings),
            multimask_output=multimask_output,
        )
        return masks.float(), iou.float()


def reduced_decoder(decoder: nn.Module, dtype: str, *, device: torch.device | str | None = None) -> nn.Module:
    """An eval-mode copy of the mask decoder running in ``dtype`` (``ReducedDecoder``);
    ``decoder`` itself for "fp32"."""
    if device is None:
        device = next(decoder.parameters()).device
    torch_dtype = check_dtype(dtype, device)
    if dtype == "fp32":
        return decoder
    low = copy.deepcopy(decoder).eval().to(device)
    for p in low.parameters():
        p.requires_grad_(False)
    low.to(torch_dtype)
    return ReducedDecoder(low, torch_dtype)


def reduced_model(model: Sam, dtype: str, *, decoder: bool = True) -> Sam:
    """A copy of a ``Sam`` whose image encoder (and, with ``decoder``, mask decoder) run in
    ``dtype``; the prompt encoder and the mask post-processing stay float32. ``model`` itself
    for "fp32"."""
    check_dtype(dtype, model.device)
    if dtype == "fp32":
        return model
    encoder, mask_decoder = model.image_encoder, model.mask_decoder
    # Shared (not copied) until replaced below: the copies are made from them.
    out = copy.deepcopy(model, {id(encoder): encoder, id(mask_decoder): mask_decoder})
    out.image_encoder = reduced_encoder(encoder, dtype)
    if decoder:  # a wrapper with MaskDecoder's call signature
        out.mask_decoder = reduced_decoder(mask_decoder, dtype)  # type: ignore[assignment]
    return out.eval()
