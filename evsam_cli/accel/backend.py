"""Decode backends: how a predictor runs the model, chosen once per predictor.

A backend holds one image embedding (``set_embedding``) and decodes prompts, already in the
prompt frame, against it. The predictor (``predictor/sam_predictor.py``) owns everything
around that: input checks, prompt transforms, batching. Two backends compute the same
function (up to float rounding, pinned by ``tests/test_optimize.py``):

* ``ReferenceBackend`` runs the model's own modules (``models/``): GPUs, autograd, tracing and
  ``torch.compile``, per-prompt image embeddings.
* ``CpuBackend`` runs the speed-ups of this package: the encoder's inference copy
  (``encoder.py``), the streamed decoder (``streaming.py``) with its per-image state held on the
  backend instance, the banded mask upscaling (``upscale.py``) and decoder passes on two threads
  (``passes.py``). It takes copies of the weights it reads when it is built, so that state
  stays valid: weights changed later (training, loading) are not seen by it.

Both run in a ``dtype`` chosen with the backend ("fp32"; "bf16" on CPUs with bf16 instructions
and GPUs; "fp16" on GPUs): the image encoder and the mask decoder are then reduced-precision
copies (``precision.py``); the prompt encoder, the image embedding handed out, the returned
logits and IoU predictions and the mask upscaling stay float32.

``select_backend`` picks one from a name ("auto": ``CpuBackend`` for a model on the CPU whose
decoder the streamed form supports, ``ReferenceBackend`` otherwise).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

from ..models.mask_decoder import MaskDecoder
from .passes import chunks, map_passes
from .streaming import (
    SharedImage,
    StreamedTokens,
    can_stream,
    decoder_streamable,
    prepare_shared,
    stream_decode,
    stream_transformer,
    upscale_tiles,
)
from .upscale import read_extent, upscale_binary, upscale_logits

if TYPE_CHECKING:
    from ..models.sam import Sam

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
BACKENDS = ("auto", "reference", "cpu")
# Prompts whose masks go through the mask head at once in ``mask_logits``.
_MASK_HEAD_PROMPTS = 32


@dataclass
class DecodedTokens:
    """The transformer's outputs for N prompts, kept for ``mask_logits`` (``decode_tokens``)."""

    mask_tokens: Tensor  # (N, num_mask_tokens, C) output mask tokens
    indices: list[int]  # the mask tokens the IoU predictions are for
    grid: tuple[int, int]  # the image-token grid (H, W)
    image: Tensor | None = None  # (N, H*W, C) final image tokens (reference)
    streamed: StreamedTokens | None = None  # the same, streamed (CpuBackend)


class ReferenceBackend:
    """The model's own modules (see the module doc)."""

    name = "reference"

    def __init__(self, model: Sam, *, optimize_encoder: bool = False, dtype: str = "fp32") -> None:
        """
        Args:
          model: the model whose modules run.
          optimize_encoder: run the image encoder through an inference copy with BatchNorm
            folded and channels-last layout (``encoder.optimize_encoder``; same outputs up to
            float rounding; taken now, so later weight changes are not seen).
          dtype: "fp32", "bf16" or "fp16" (``precision.check_dtype`` says where each runs);
            other than fp32 the encoder and decoder run as reduced-precision copies, taken now.
        Raises:
          PrecisionError: a dtype this device cannot run.
        """
        from .encoder import optimize_encoder as make_inference_copy
        from .precision import check_dtype, reduced_encoder

        self.model = model
        self.dtype = dtype
        self.torch_dtype = check_dtype(dtype, model.device)
        self.image_encoder: nn.Module
        if dtype != "fp32":
            self.image_encoder = reduced_encoder(model.image_encoder, dtype)
        elif optimize_encoder:
            self.image_encoder = make_inference_copy(model.image_encoder)
        else:
            self.image_encoder = model.image_encoder
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        if dtype != "fp32":
            self.mask_decoder = _inference_copy(model.mask_decoder).to(self.torch_dtype)
        self.embedding: Tensor | None = None
        self._low: Tensor | None = None  # the embedding in the backend's dtype

    # ------------------------------------------------------------------ image
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) encoder input -> (B, 256, 64, 64) embeddings."""
        return self.image_encoder(images)

    def set_embedding(self, embedding: Tensor) -> None:
        """The (1 or N, 256, 64, 64) image embedding the following decodes run against (as
        given; ``_image`` is what the decoder reads, in the backend's dtype)."""
        self.embedding = embedding
        self._low = None

    def _image(self) -> Tensor:
        if self.embedding is None:
            raise RuntimeError("the decode backend has no image embedding (call set_embedding first)")
        if self.embedding.dtype == self.torch_dtype:
            return self.embedding
        low = self._low
        if low is None:  # cast once per image (a race between two passes only casts twice)
            low = self._low = self.embedding.to(self.torch_dtype)
        return low

    def _dense_pe(self) -> Tensor:
        return self.prompt_encoder.get_dense_pe().to(self.torch_dtype)

    # ------------------------------------------------------------------ decoding
    def _embed(
        self,
        point_coords: Tensor | None,
        point_labels: Tensor | None,
        boxes: Tensor | None,
        mask_input: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return sparse.to(self.torch_dtype), dense.to(self.torch_dtype)

    def decode(
        self,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Prompts in the prompt frame -> (N, M, 256, 256) low-res logits and (N, M) IoU
        predictions, M = 3 with ``multimask_output`` else 1 (``Sam.decode``)."""
        sparse, dense = self._embed(point_coords, point_labels, boxes, mask_input)
        low_res, iou = self._decode_embedded(sparse, dense, multimask_output, mask_input is not None)
        return low_res.float(), iou.float()

    def _decode_embedded(
        self, sparse: Tensor, dense: Tensor, multimask_output: bool, has_mask_input: bool
    ) -> tuple[Tensor, Tensor]:
        """The mask decoder on embedded prompts (sparse (N, T, C), dense) -> logits and IoUs."""
        return self.mask_decoder(self._image(), self._dense_pe(), sparse, dense, multimask_output)

    def decode_tokens(
        self,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
    ) -> tuple[Tensor, DecodedTokens]:
        """The first half of a multimask decode: the transformer and the IoU head only.

        Returns the IoU predictions (N, 3) of the multimask outputs and what ``mask_logits``
        needs to compute the masks of some of them later (automatic mask generation runs the
        mask head only for the masks its IoU filter keeps).
        """
        sparse, dense = self._embed(point_coords, point_labels, boxes, None)
        return self._decode_tokens_embedded(sparse, dense)

    def _decode_tokens_embedded(self, sparse: Tensor, dense: Tensor) -> tuple[Tensor, DecodedTokens]:
        """``decode_tokens`` on embedded prompts."""
        dec = self.mask_decoder
        iou, mask_tokens, image, grid = dec.run_transformer(self._image(), self._dense_pe(), sparse, dense)
        indices = list(range(1, dec.num_mask_tokens))
        return iou[:, indices].float(), DecodedTokens(mask_tokens, indices, grid, image=image)

    def mask_logits(
        self,
        tokens: DecodedTokens,
        prompt_idx: Tensor,
        token_idx: Tensor,
        *,
        extent: tuple[int, int] | None = None,
    ) -> Tensor:
        """The second half: low-res logits (K, 256, 256) of the outputs ``token_idx`` (positions
        in the IoU predictions' columns) of the prompts ``prompt_idx`` (both (K,)).

        ``extent`` (rows, cols): only the logits ``[:rows, :cols]`` will be read (``read_extent``
        of an upscaling); a backend may then return zeros elsewhere (this one computes all).
        """
        needed, inverse = torch.unique(prompt_idx, return_inverse=True)
        out = [self._mask_head(tokens, ids) for ids in needed.split(_MASK_HEAD_PROMPTS)]
        return torch.cat(out)[inverse, token_idx].float()

    def read_extent(
        self, low_res: tuple[int, int], input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> tuple[int, int]:
        """The leading (rows, cols) of (h, w) low-res logits that ``upscale`` to ``original_size``
        weighs (the rest is padding of the prompt frame), for ``mask_logits(extent=...)``."""
        frame = self.model.prompt_size
        return (
            read_extent(low_res[0], frame, input_size[0], original_size[0]),
            read_extent(low_res[1], frame, input_size[1], original_size[1]),
        )

    def _mask_head(self, tokens: DecodedTokens, ids: Tensor) -> Tensor:
        assert tokens.image is not None
        return self.mask_decoder.mask_head(
            tokens.image[ids], tokens.grid, tokens.mask_tokens[ids], tokens.indices
        )

    # ------------------------------------------------------------------ masks and passes
    def upscale(
        self, low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], *, binary: bool
    ) -> Tensor:
        """Low-res logits (N, M, 256, 256) -> logits at the original size (N, M, H, W), or with
        ``binary`` the masks ``logits > mask_threshold`` (bool)."""
        logits = self.model.postprocess_masks(low_res, input_size, original_size)
        return logits > self.model.mask_threshold if binary else logits

    def map_passes(self, fn: Callable[[slice], T], n: int, step: int) -> list[T]:
        """``fn`` over consecutive slices of ``n`` prompts, at most ``step`` each, in order."""
        return [fn(sl) for sl in chunks(0, n, step)]


class CpuBackend(ReferenceBackend):
    """The speed-ups of this package, for inference on the CPU (see the module doc)."""

    name = "cpu"

    def __init__(self, model: Sam, *, optimize_encoder: bool = True, dtype: str = "fp32") -> None:
        """
        Args:
          model: a model on the CPU whose decoder the streamed form supports
            (``streaming.decoder_streamable``). Its prompt encoder and mask decoder are copied
            now, so the per-image state below stays valid however the model changes later.
          optimize_encoder / dtype: as for ``ReferenceBackend`` (optimize on by default here).
        Raises:
          ValueError: the model is not on the CPU, or its decoder is not supported.
        """
        if model.device.type != "cpu":
            raise ValueError(f"the cpu decode backend needs a model on the CPU, not {model.device}")
        if not decoder_streamable(model.mask_decoder):
            raise ValueError("the cpu decode backend supports SAM's mask decoder configuration only")
        super().__init__(model, optimize_encoder=optimize_encoder, dtype=dtype)
        self.prompt_encoder = _inference_copy(model.prompt_encoder)
        if dtype == "fp32":  # (a reduced-precision copy is already one)
            self.mask_decoder = _inference_copy(model.mask_decoder)
        self._lock = threading.Lock()
        self._pe: Tensor | None = None
        self._shared: SharedImage | None = None

    def set_embedding(self, embedding: Tensor) -> None:
        with self._lock:
            super().set_embedding(embedding)
            self._shared = None  # computed on the first decode that streams

    def _streamed_image(self, dense: Tensor, *, masks: bool) -> tuple[Tensor, SharedImage] | None:
        """The positional encoding and what the streamed decoder computes from the image alone,
        when these inputs stream (inference, one shared image, one dense embedding), else None.
        Kept until the next ``set_embedding`` for prompts without mask inputs, whose dense
        embedding is the no-mask embedding, fixed with the copied weights."""
        image = self._image()
        if not can_stream(self.mask_decoder, image, dense):
            return None
        with self._lock:  # two decoder passes may ask at once (``map_passes``)
            if self._pe is None:
                self._pe = self._dense_pe()
            if masks:  # a mask input's dense embedding: for this call only
                return self._pe, SharedImage.compute(self.mask_decoder.transformer, image + dense, self._pe)
            if self._shared is None:
                self._shared = SharedImage.compute(self.mask_decoder.transformer, image + dense, self._pe)
            return self._pe, self._shared

    def _decode_embedded(
        self, sparse: Tensor, dense: Tensor, multimask_output: bool, has_mask_input: bool
    ) -> tuple[Tensor, Tensor]:
        """The streamed decoder where these inputs stream (``_streamed_image``), else the module."""
        streamed = self._streamed_image(dense, masks=has_mask_input)
        if streamed is None:
            return super()._decode_embedded(sparse, dense, multimask_output, has_mask_input)
        pe, shared = streamed
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return stream_decode(self.mask_decoder, self._image(), pe, sparse, dense, mask_slice, shared)

    def _decode_tokens_embedded(self, sparse: Tensor, dense: Tensor) -> tuple[Tensor, DecodedTokens]:
        """The streamed transformer where these inputs stream (``_streamed_image``), else the module."""
        streamed = self._streamed_image(dense, masks=False)
        if streamed is None:
            return super()._decode_tokens_embedded(sparse, dense)
        pe, shared = streamed
        dec = self.mask_decoder
        indices = list(range(1, dec.num_mask_tokens))
        read_out = [0] + [1 + i for i in indices]  # the IoU token and the multimask tokens
        tokens = dec.prompt_tokens(sparse)
        hs, image_tokens = stream_transformer(
            dec.transformer, self._image() + dense, pe, tokens, read_out, shared
        )
        iou = dec.iou_prediction_head(hs[:, 0])[:, indices].float()
        # mask tokens laid out as the module path's, those not read out left at zero
        mask_tokens = hs.new_zeros(hs.shape[0], dec.num_mask_tokens, hs.shape[2])
        mask_tokens[:, indices] = hs[:, 1:]
        grid = (self._image().shape[-2], self._image().shape[-1])
        return iou, DecodedTokens(mask_tokens, indices, grid, streamed=image_tokens)

    def mask_logits(
        self,
        tokens: DecodedTokens,
        prompt_idx: Tensor,
        token_idx: Tensor,
        *,
        extent: tuple[int, int] | None = None,
    ) -> Tensor:
        if tokens.streamed is None or len(torch.unique(prompt_idx)) != len(prompt_idx):
            return super().mask_logits(tokens, prompt_idx, token_idx)
        # One mask per prompt (``predict_best``, most segment-everything batches): the mask head's
        # convolutions are shared by a prompt's outputs, but its hypernetwork product, the
        # largest write, is then made for the wanted output only.
        hyper = _hypernetwork_vectors(self.mask_decoder, tokens, prompt_idx)
        chosen = hyper[torch.arange(len(prompt_idx)), token_idx].unsqueeze(1)  # (K, 1, C2)
        streamed = tokens.streamed
        # Tokens whose logits lie in the padding of the prompt frame are skipped (zeros).
        out = [
            upscale_tiles(self.mask_decoder, streamed.select(prompt_idx[sl]), chosen[sl], tokens.grid, extent)
            for sl in chunks(0, len(prompt_idx), _MASK_HEAD_PROMPTS)
        ]
        return torch.cat(out)[:, 0].float()

    def _mask_head(self, tokens: DecodedTokens, ids: Tensor) -> Tensor:
        if tokens.streamed is None:
            return super()._mask_head(tokens, ids)
        hyper = _hypernetwork_vectors(self.mask_decoder, tokens, ids)
        return upscale_tiles(self.mask_decoder, tokens.streamed.select(ids), hyper, tokens.grid)

    def upscale(
        self, low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], *, binary: bool
    ) -> Tensor:
        prompt_size = self.model.prompt_size
        if not binary:
            return upscale_logits(low_res, input_size, original_size, prompt_size)
        # Every upscaled pixel is a convex combination of low-res logits (weights summing to 1),
        # so the threshold is subtracted first and the rest compares with 0.
        threshold = self.model.mask_threshold
        if threshold != 0.0:
            low_res = low_res - threshold
        return upscale_binary(low_res, input_size, original_size, prompt_size)

    def map_passes(self, fn: Callable[[slice], T], n: int, step: int) -> list[T]:
        if self.embedding is not None:
            self._prepare_image()
        return map_passes(fn, n, step, torch.device("cpu"))

    def _prepare_image(self) -> None:
        """The image's shared decoder state for prompts without mask inputs, made here with all
        intra-op threads, before the passes split into two threads that would each make it."""
        with torch.inference_mode():
            _, dense = self._embed(None, None, None, None)
            streamed = self._streamed_image(dense, masks=False)
            if streamed is not None:
                with self._lock:
                    prepare_shared(self.mask_decoder, streamed[1])


def _hypernetwork_vectors(decoder: MaskDecoder, tokens: DecodedTokens, ids: Tensor) -> Tensor:
    """The hypernetwork vectors (K, len(indices), C2) of the prompts ``ids``."""
    return torch.stack(
        [decoder.output_hypernetworks_mlps[i](tokens.mask_tokens[ids, i]) for i in tokens.indices], dim=1
    )


def _inference_copy(module: M) -> M:
    out = copy.deepcopy(module).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def cpu_backend_applies(model: Sam) -> bool:
    """Whether ``CpuBackend`` can run ``model`` (CPU, float32, a supported decoder)."""
    weight = next(model.mask_decoder.parameters())
    return (
        model.device.type == "cpu"
        and weight.dtype == torch.float32
        and decoder_streamable(model.mask_decoder)
    )


def select_backend(
    model: Sam,
    backend: str | ReferenceBackend = "auto",
    *,
    optimize_encoder: bool = True,
    dtype: str = "fp32",
) -> ReferenceBackend:
    """The decode backend ``backend`` ("auto", "reference", "cpu", or a backend instance) for
    ``model``, running in ``dtype``. "auto" is "cpu" where ``cpu_backend_applies``, "reference"
    otherwise."""
    if isinstance(backend, ReferenceBackend):
        if backend.dtype != dtype:
            raise ValueError(f"the given backend runs {backend.dtype}, not {dtype}")
        return backend
    if backend == "auto":
        backend = "cpu" if cpu_backend_applies(model) else "reference"
    if backend == "cpu":
        return CpuBackend(model, optimize_encoder=optimize_encoder, dtype=dtype)
    if backend == "reference":
        return ReferenceBackend(model, optimize_encoder=optimize_encoder, dtype=dtype)
    raise ValueError(f"unknown decode backend {backend!r}: use one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "CpuBackend",
    "DecodedTokens",
    "ReferenceBackend",
    "cpu_backend_applies",
    "select_backend",
]
