"""Inference-only mask decoding for many prompts on one image, streamed over image-token tiles.

``MaskDecoder.predict_masks`` follows SAM's module structure: after the first image->token
attention every prompt owns a (4096 x 256) copy of the image tokens, and each further step
(residual add, LayerNorm, adding the positional encoding, the next attention, the upscaling
convolutions) is one full pass over those copies. On a CPU that memory traffic, not arithmetic,
is what the decoder spends most of its time on. This module computes the same function in a
different order:

* Everything an image->token attention does is local to one image token (a softmax over the
  few prompt tokens, a residual, a LayerNorm), and so are the upscaling convolutions (a 2x2,
  stride-2 transposed convolution maps one input pixel to its own 2x2 output block). The image
  tokens are therefore processed in tiles of rows that stay in cache, one pass per layer.
* The token->image attention that follows each such step needs a softmax over *all* image
  tokens: it is taken online, tile by tile (running maxima and sums, as in flash attention),
  so a layer's tiles are kept only where the next layer reads them again.
* Projections are moved to the prompt-token side of every cross attention (exact algebra:
  softmax(q (x Wk^T + bk)^T) = softmax((q Wk) x^T), since q.bk is constant per row, and
  P (x Wv^T + bv) = (P x) Wv^T + bv, since the rows of P sum to one), and the first layer's
  image-side projections, shared by all prompts, are computed once per image
  (``SharedImage``); the decode backend (``backend.CpuBackend``) keeps them for as long as it
  holds that image, which matters most for interactive use, one prompt per call.
* The tokens after the first layer are the shared tokens plus a few prompt-dependent vectors
  per token, rescaled, so the attentions that read them next (the second layer's both ways)
  work from that low-rank form (``_AfterShared``): per prompt, products against d = 16
  channels per head and against the first layer's attention weights instead of C = 256.
* The final token->image attention is computed only for the output tokens that are read out.
* The mask head's first convolution is linear, and every image->token step only adds a few
  prompt-dependent vectors per token and rescales (LayerNorm), so that convolution is expanded
  into a part shared by all prompts plus a low-rank per-prompt product (``_FirstConv``).

Results equal the module path up to float rounding (pinned by ``tests/test_optimize.py``).
Inference on a CPU reaches it through ``backend.CpuBackend``, which also keeps the per-image
part between calls; CPU training through ``decode_prompts``, since every step here is an
ordinary differentiable op and autograd's backward of the reordered forward is the module's
gradient, at a fraction of its memory traffic (``tests/test_optimize.py`` pins the gradients
too). Export, GPUs and per-prompt image embeddings use the module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mask_decoder import MaskDecoder
from ..models.sam import Sam
from ..models.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

# Elements per tile across all prompts of a pass (2 MiB of float32, rounded to whole rows of the
# token grid): a tile's intermediates stay in the CPU's L2/L3 caches, and are few enough per pass
# that the fixed cost of each tile's small products stays low (docs/benchmarks.md).
TILE_ELEMENTS = 1 << 19


class _TokenAttention:
    """A token->image attention reduced to the image side, fed one tile of image tokens at a time.

    ``weights`` (N, h*T, C) are the queries already multiplied into the key projection, so the
    logits over image tokens x are ``weights @ (x + pe)^T + bias``. The key bias only adds a
    constant per row, which the softmax cancels, but it is kept so that under autograd it takes
    part as in the module (a gradient, zero up to rounding, rather than none: the optimizer then
    treats the parameter alike on every device). The softmax over all image tokens is taken
    online, as in flash attention: each tile's values are mixed in as it comes, weighted against
    the row maxima seen so far, and the sums so far are rescaled when a maximum grows. So no
    tile has to be kept until the last one is seen.
    """

    def __init__(self, attn: Attention, queries: Tensor) -> None:
        n, t, c = queries.shape
        h = attn.num_heads
        d = attn.internal_dim // h
        qh = attn.q_proj(queries).reshape(n, t, h, d).transpose(1, 2)  # (N, h, T, d)
        self.attn = attn
        self.weights = (qh @ attn.k_proj.weight.reshape(h, d, c)).reshape(n, h * t, c) * d**-0.5
        self.bias = (qh @ attn.k_proj.bias.reshape(h, d, 1)).reshape(n, h * t, 1) * d**-0.5
        self.max: Tensor | None = None  # (N, hT, 1) row maxima of the logits so far
        self.sum: Tensor | None = None  # (N, hT, 1) sums of exp(logits - max) so far
        self.mixed: Tensor | None = None  # (N, hT, C) the same weights times the image tokens

    def add_tile(self, keys: Tensor, values: Tensor) -> None:
        """keys = tile + pe, values = tile (N, R, C)."""
        logits = torch.baddbmm(self.bias, self.weights, keys.transpose(1, 2))  # (N, hT, R)
        top = logits.amax(dim=2, keepdim=True)
        if self.max is None or self.sum is None or self.mixed is None:
            e = torch.exp(logits - top)
            self.max, self.sum, self.mixed = top, e.sum(dim=2, keepdim=True), e @ values
            return
        top = torch.maximum(top, self.max)
        rescale = torch.exp(self.max - top)
        e = torch.exp(logits - top)
        self.max = top
        self.sum = torch.addcmul(e.sum(dim=2, keepdim=True), self.sum, rescale)
        self.mixed = torch.baddbmm(self.mixed * rescale, e, values)

    def finish(self) -> Tensor:
        """The attention's output (N, T, C), once every tile is added."""
        attn = self.attn
        n, ht, c = self.weights.shape
        h = attn.num_heads
        t, d = ht // h, attn.internal_dim // h
        assert self.mixed is not None and self.sum is not None, "no tiles were added"
        mixed = self.mixed / self.sum  # softmax-weighted image tokens, per head
        wv = attn.v_proj.weight.reshape(h, d, c)
        out = mixed.reshape(n, h, t, c) @ wv.transpose(1, 2) + attn.v_proj.bias.reshape(h, 1, d)
        return attn.out_proj(out.transpose(1, 2).reshape(n, t, h * d))


@dataclass
class _ImageAttention:
    """An image->token attention (+ residual, + LayerNorm) reduced to per-image-token work.

    Logits of image tokens x over the prompt tokens are ``weights @ (x + pe)^T + bias`` with the
    query projection folded into ``weights`` (N, h*T, C); the softmax runs over the T prompt
    tokens of each head; values come out-projected (``values`` (N, h*T, C)), with the out bias
    added once. ``weights`` are folded only for the tile-by-tile path (``fold_queries``): when
    the image tokens are the same for all prompts their query projection is shared instead
    (``shared_q``), and after the first layer the logits come from the low-rank form.
    """

    attn: Attention
    norm: nn.LayerNorm
    keys: Tensor  # (N, h, T, d) projected, scaled prompt-token keys
    weights: Tensor | None
    bias: Tensor | None
    values: Tensor

    @classmethod
    def start(
        cls, attn: Attention, norm: nn.LayerNorm, k: Tensor, v: Tensor, *, fold_queries: bool
    ) -> _ImageAttention:
        n, t, c = k.shape
        h = attn.num_heads
        d = attn.internal_dim // h
        kh = attn.k_proj(k).reshape(n, t, h, d).transpose(1, 2) * d**-0.5  # (N, h, T, d)
        vh = attn.v_proj(v).reshape(n, t, h, d).transpose(1, 2)
        wo = attn.out_proj.weight.reshape(c, h, d).permute(1, 2, 0)  # (h, d, C)
        # Each head's softmax weights sum to 1, so the out-projection bias can ride on the values.
        values = (vh @ wo + attn.out_proj.bias / h).reshape(n, h * t, c)
        weights = bias = None
        if fold_queries:
            wq = attn.q_proj.weight.reshape(h, d, c)
            weights = (kh @ wq).reshape(n, h * t, c)
            bias = (kh @ attn.q_proj.bias.reshape(h, d, 1)).reshape(n, h * t, 1)
        return cls(attn, norm, kh, weights, bias, values)

    def apply(
        self,
        residual: Tensor,
        keys: Tensor | None,
        shared_q: Tensor | None = None,
        logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """norm(residual + attention) for one tile: residual (N or 1, R, C); keys = tile + pe
        (N, R, C), or instead ``shared_q`` (h, R, d) when the tile is shared by all prompts, or
        the attention logits (N, h*T, R) themselves.

        Returns the tile (N, R, C), the attention weights (N, h*T, R) and the LayerNorm's
        reciprocal standard deviations (N, R, 1), which ``_FirstConv`` needs.
        """
        n, h, t, _ = self.keys.shape
        if logits is not None:
            logits = logits.reshape(n, h, t, -1)
        elif shared_q is not None:  # (h, R, d) query projection shared by all prompts
            logits = (self.keys @ shared_q.transpose(1, 2)).reshape(n, h, t, -1)  # (N, h, T, R)
        else:
            assert self.bias is not None and self.weights is not None and keys is not None
            logits = torch.baddbmm(self.bias, self.weights, keys.transpose(1, 2)).reshape(n, h, t, -1)
        p = torch.softmax(logits, dim=2).reshape(n, h * t, -1)
        out = torch.baddbmm(residual, p.transpose(1, 2), self.values)
        norm = self.norm
        if torch.is_grad_enabled():
            out, rstd = _LayerNormWithRstd.apply(out, norm.weight, norm.bias, norm.eps)
        else:
            out, _, rstd = torch.native_layer_norm(out, out.shape[-1:], norm.weight, norm.bias, norm.eps)
        return out, p, rstd


class _LayerNormWithRstd(torch.autograd.Function):
    """LayerNorm over the last axis that also returns its per-row 1/std (N, R, 1), with a gradient
    through both outputs: ``_FirstConv`` and ``_AfterShared`` compute with the 1/std, and
    ``native_layer_norm``'s backward ignores a gradient reaching it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y, rstd

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_rstd: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if grad_y is not None:
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, x.shape[-1:], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3])
            )
        if grad_rstd is not None and ctx.needs_input_grad[0]:
            # rstd = (var + eps)^(-1/2) with var = mean((x - mean)^2): d rstd / dx = -rstd^3 (x - mean) / C
            extra = (grad_rstd * rstd.pow(3) / -x.shape[-1]) * (x - mean)
            grad_x = extra if grad_x is None else grad_x + extra
        return grad_x, grad_w, grad_b, None


@dataclass
class _LayerRecord:
    """What one image->token attention did to the image tokens (see ``_FirstConv``)."""

    norm: nn.LayerNorm
    values: Tensor  # (N, h*T, C) out-projected values of the prompt tokens, out bias folded in
    probs: list[Tensor] = field(default_factory=list)  # per tile (N, h*T, R) attention weights
    rstd: list[Tensor] = field(default_factory=list)  # per tile (N, R, 1) LayerNorm 1/std


@dataclass
class StreamedTokens:
    """The transformer's final image tokens for N prompts, in tiles of whole rows of the token
    grid (``rows``, in order), as how they were made from the shared image tokens: ``image`` and
    one record per layer. That is what the mask head reads (``_FirstConv``: most of its first
    convolution is then done once per image). The tokens themselves, (N, R, C) per tile, are
    kept only where asked for (``tiles``; ``torch.cat(tiles, 1)`` is the module's keys output).
    """

    rows: list[slice]
    image: SharedImage
    layers: list[_LayerRecord]
    tiles: list[Tensor] | None = None

    def select(self, ids: Tensor) -> StreamedTokens:
        """The same for the prompts ``ids`` only."""
        if len(ids) == self.layers[0].values.shape[0] and torch.equal(ids.cpu(), torch.arange(len(ids))):
            return self  # all of them, in order: nothing to copy
        layers = [
            _LayerRecord(r.norm, r.values[ids], [p[ids] for p in r.probs], [s[ids] for s in r.rstd])
            for r in self.layers
        ]
        tiles = None if self.tiles is None else [t[ids] for t in self.tiles]
        return StreamedTokens(self.rows, self.image, layers, tiles)


class _AfterShared:
    """The image tokens after the first layer, without forming them, for the attentions that read
    them next (the second layer's, or the final one).

    Per prompt they are x1 = r1 (x0c + P^T Vc) G + beta (rows = image tokens): x0c the shared
    tokens centred, P (h*T, HW) the first image->token attention's weights, Vc its values
    centred, r1 the LayerNorm's per-token 1/std and G, beta its affine. A projection W of them is
    therefore r1 (x0c G W^T + P^T (Vc G W^T)) + beta W^T: a (HW x h*d) product shared by every
    prompt and call on the image, plus per prompt an (h*T x h*d) one applied through P. Against
    a query's h*T rows that is h*T x HW x d multiplications per prompt instead of h*T x HW x C.
    """

    def __init__(self, shared: SharedImage, record: _LayerRecord) -> None:
        self.shared = shared
        self.norm = record.norm
        self.p = torch.cat(record.probs, dim=2)  # (N, hT, HW)
        self.r = torch.cat(record.rstd, dim=1).transpose(1, 2)  # (N, 1, HW)
        self.values = _centre(record.values) * record.norm.weight  # (N, hT, C): Vc G

    def logits(self, qh: Tensor, proj: nn.Linear) -> Tensor:
        """qh (N, h, T, d) dotted with (W (x1 + pe) + bias)_h for every image token, W and bias
        those of ``proj`` -> (N, hT, HW)."""
        n, h, t, d = qh.shape
        weight = proj.weight
        image = _after_first_layer(self.shared, self.norm, proj, h, pe=True)  # (h, d, 2 HW)
        hw = image.shape[2] // 2
        shared = (qh.transpose(0, 1).reshape(h, n * t, d) @ image).reshape(h, n, t, 2 * hw)
        shared = shared.transpose(0, 1).reshape(n, h * t, 2 * hw)
        vw = (self.values @ weight.T).reshape(n, -1, h, d)
        coupling = torch.einsum("nhtd,njhd->nhtj", qh, vw).reshape(n, h * t, -1)  # (N, hT, hT)
        scaled = torch.baddbmm(shared[:, :, :hw], coupling, self.p)
        return torch.addcmul(shared[:, :, hw:], scaled, self.r)

    def attend(self, attn: Attention, queries: Tensor) -> Tensor:
        """The token->image attention ``attn`` of queries (N, T, C) over the image tokens x1
        (keys x1 + pe, values x1) -> (N, T, C)."""
        n, t, _ = queries.shape
        h = attn.num_heads
        d = attn.internal_dim // h
        qh = attn.q_proj(queries).reshape(n, t, h, d).transpose(1, 2) * d**-0.5
        # (the key bias adds a constant to each row, which the softmax cancels: kept as in the module)
        a = torch.softmax(self.logits(qh, attn.k_proj), dim=2)
        ar = a * self.r  # (N, hT, HW)
        wv = attn.v_proj.weight
        image = _after_first_layer(self.shared, self.norm, attn.v_proj, h, pe=False)  # (h, d, HW)
        mixed = ar.reshape(n, h, t, -1).transpose(0, 1).reshape(h, n * t, -1) @ image.transpose(1, 2)
        mixed = mixed.reshape(h, n, t, d).transpose(0, 1)  # (N, h, T, d)
        coupling = (ar @ self.p.transpose(1, 2)).reshape(n, h, t, -1)  # (N, h, T, hT)
        vv = (self.values @ wv.T).reshape(n, -1, h, d)
        mixed = mixed + torch.einsum("nhtj,njhd->nhtd", coupling, vv)
        # rows of a sum to one: beta and the value bias pass through whole
        mixed = mixed + (wv @ self.norm.bias + attn.v_proj.bias).reshape(h, 1, d)
        return attn.out_proj(mixed.transpose(1, 2).reshape(n, t, h * d))


def _after_first_layer(
    shared: SharedImage, norm: nn.LayerNorm, proj: nn.Linear, heads: int, *, pe: bool
) -> Tensor:
    """``_AfterShared``'s per-image part of a projection W, bias b (``proj``) of the image tokens
    after the first layer (whose LayerNorm is ``norm``): x0c G W^T as (h, d, HW), and with ``pe``
    (pe + beta) W^T + b beside it, as (h, d, 2 HW). Computed once per image and projection."""
    name = f"{id(proj)}:{pe}"
    got = shared.derived.get(name)
    if got is None:
        weight = proj.weight
        parts = [(_centre(shared.src[0]) * norm.weight) @ weight.T]
        if pe:
            parts.append(F.linear(shared.pe[0] + norm.bias, weight, proj.bias))
        got = shared.derived[name] = (
            torch.cat(parts).reshape(-1, heads, weight.shape[0] // heads).permute(1, 2, 0).contiguous()
        )
    return got


class _Upscaler:
    """The decoder's upscaling path + hypernetwork product, per image token.

    A 2x2 stride-2 transposed convolution is a per-pixel linear map C_in -> 4 x C_out, so the
    whole path (convT, LayerNorm2d, act, convT, act, dot with the hypernetwork vectors) maps one
    image token to its 4x4 block of mask logits with no neighbours involved.
    """

    def __init__(self, upscaling: nn.Sequential) -> None:
        conv1, conv2 = cast(nn.ConvTranspose2d, upscaling[0]), cast(nn.ConvTranspose2d, upscaling[3])
        norm = cast(nn.LayerNorm, upscaling[1])  # LayerNorm2d: weight, bias, eps over channels
        self.act1, self.act2 = upscaling[2], upscaling[4]
        if conv1.bias is None or conv2.bias is None:
            raise ValueError("the streamed mask head needs the upscaling convolutions' biases (SAM's)")
        self.c1 = conv1.out_channels
        self.c2 = conv2.out_channels
        # (C_in, C_out, 2, 2) -> (C_in, 2*2*C_out): output columns ordered (a, b, channel).
        self.w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, -1)
        self.b1 = conv1.bias.repeat(4)
        self.w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.in_channels, -1)  # columns (c, d, channel)
        self.b2 = conv2.bias.repeat(4)
        self.fused = _fused_linear(self.act2, self.w2, self.b2)
        self.norm = norm

    def rest(self, y: Tensor, hyper: Tensor, out: Tensor) -> None:
        """First-convolution outputs (N, R, 4*C1) of R tokens (whole rows of the W-token grid),
        hyper (N, M, C2) -> their mask logits, written to ``out`` (N, M, R / W, 2, 2, W, 2, 2).

        Token (i, j) with offsets (a, b), then (c, d) is pixel (4i + 2a + c, 4j + 2b + d): the
        logits come out ordered (i, j, a, b, c, d) and are written to the mask's order
        (i, a, c, j, b, d) in one strided copy, which is M / C1 the size of reordering the
        first convolution's outputs instead.
        """
        n, m, rows, _, _, w = out.shape[:6]
        y = F.layer_norm(y.reshape(-1, self.c1), (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps)
        z = self.fused(self.act1(y))  # rows (i, j, a, b), columns (c, d, channel)
        logits = torch.bmm(hyper, z.reshape(n, -1, self.c2).transpose(1, 2))  # (N, M, (i, j, a, b, c, d))
        out.copy_(logits.reshape(n, m, rows, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7))


def _fused_linear(act: nn.Module, weight: Tensor, bias: Tensor) -> Callable[[Tensor], Tensor]:
    """x -> act(x @ weight + bias). Where oneDNN is available and ``act`` is one it fuses (exact or
    tanh GELU, ReLU), one ``mkldnn._linear_pointwise`` call: the activation runs on the product
    while it is still in cache, and the bias is added by the same kernel instead of being copied
    into the output first. Same values up to float rounding."""
    attr: tuple[str, str] | None = None
    if isinstance(act, nn.GELU):
        attr = ("gelu", act.approximate)
    elif isinstance(act, nn.ReLU):
        attr = ("relu", "")
    if attr is None or not torch.backends.mkldnn.is_available() or weight.dtype != torch.float32:
        return lambda x: act(torch.addmm(bias, x, weight))
    name, algorithm = attr
    weight_t = weight.t().contiguous()  # (out, in), as F.linear

    def fused(x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.dtype != weight_t.dtype:  # the oneDNN op has no backward
            return act(torch.addmm(bias, x, weight))
        return torch.ops.mkldnn._linear_pointwise(x, weight_t, bias, name, [], algorithm)

    return fused


class _FirstConv:
    """The mask head's first convolution (per-token linear map W, bias w0) of the final image
    tokens, expanded through the transformer's image->token steps.

    With row vectors, layer l maps image tokens x to LN_l(x + P_l V_l) = r_l (x + P_l V_l) Z G_l
    + beta_l, where P_l (R x hT) are the attention weights, V_l (hT x C) the prompt's values (out
    bias folded in), Z = I - 11^T/C the centring matrix, r_l the per-token 1/std and G_l =
    diag(gamma_l). Unrolled from the shared image tokens x_0, with A_{L+1} = W, A_l = Z G_l A_{l+1}
    and S_l = r_l * ... * r_L (per token):

        x_L W = S_1 x_0 A_1 + sum_l S_l P_l (V_l A_l) + sum_{l>1} S_l beta_{l-1} A_l + beta_L W

    x_0 A_1 is shared by every prompt; per prompt what is left is a product with h*T+1 rows per
    layer (114 for SAM's box prompts) instead of C = 256. Same values up to float rounding.
    """

    def __init__(self, up: _Upscaler, tokens: StreamedTokens) -> None:
        self.layers = tokens.layers
        mats = _unrolled(up.w1, [record.norm for record in self.layers])
        n = self.layers[0].values.shape[0]
        if tokens.image.first_conv is None:  # x_0 A_1 (1, HW, 4*C1), once per image
            tokens.image.first_conv = _centre(tokens.image.src) @ mats[0]
        self.base = tokens.image.first_conv
        rows = []
        for i, record in enumerate(self.layers):
            rows.append(_centre(record.values) @ mats[i])  # (N, hT, 4*C1)
            if i:
                rows.append((_centre(self.layers[i - 1].norm.bias) @ mats[i]).expand(n, 1, -1))
        self.basis = torch.cat(rows, dim=1)
        self.const = self.layers[-1].norm.bias @ up.w1 + up.b1

    def tile(self, k: int, sl: slice, width: int, cols: int) -> Tensor:
        """First-convolution outputs (N, R', 4*C1) of tile ``k``, image tokens ``sl`` (whole rows of
        ``width`` tokens), for the first ``cols`` tokens of each row (R' of the tile's R)."""
        n, _, r = self.layers[0].probs[k].shape

        def kept(x: Tensor, dim: int = -1) -> Tensor:  # R -> R' tokens along ``dim``
            if cols == width:
                return x
            d = dim % x.dim()
            return x.unflatten(d, (-1, width)).narrow(d + 1, 0, cols).flatten(d, d + 1)

        scales: list[Tensor] = []  # S_L, ..., S_1 as (N, 1, R')
        for record in reversed(self.layers):
            rstd = kept(record.rstd[k].reshape(n, 1, r))
            scales.append(rstd if not scales else scales[-1] * rstd)
        scales.reverse()
        rows = []  # the coefficients, transposed: (N, rows of the basis, R')
        for i, record in enumerate(self.layers):
            rows.append(kept(record.probs[k]) * scales[i])
            if i:
                rows.append(scales[i])
        coef = torch.cat(rows, dim=1).transpose(1, 2)
        first = torch.addcmul(self.const, kept(self.base[:, sl], 1), scales[0].transpose(1, 2))
        return torch.baddbmm(first, coef, self.basis)


def _unrolled(w: Tensor, norms: list[nn.LayerNorm]) -> list[Tensor]:
    """``_FirstConv``'s G_l A_{l+1} for a map W (C, D) after the layers' LayerNorms ``norms``, so
    that v A_l = centre(v) @ result[l]."""
    mats = []
    a = w
    for norm in reversed(norms):
        g_a = norm.weight[:, None] * a
        mats.append(g_a)
        a = g_a - g_a.mean(0)
    return mats[::-1]


def _centre(v: Tensor) -> Tensor:
    return v - v.mean(-1, keepdim=True)


@dataclass
class SharedImage:
    """What the streamed decoder computes from the image alone: the same for every prompt and
    every call on one image, so the decode backend keeps it while it holds the image
    (``backend.CpuBackend``)."""

    src: Tensor  # (1, HW, C) image tokens, dense prompt embedding added
    pe: Tensor  # (1, HW, C) their positional encoding
    keys: Tensor  # (1, h, HW, d) the first token->image attention's projected keys ...
    values: Tensor  # ... and values
    queries: Tensor  # (h, HW, d) the first image->token attention's projected queries
    first_conv: Tensor | None = None  # ``_FirstConv``'s per-image part, filled on first use
    derived: dict[str, Tensor] = field(default_factory=dict)  # ``_AfterShared``'s, likewise

    @classmethod
    def compute(cls, transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor) -> SharedImage:
        """image: (1, C, H, W) embedding with the dense prompt embedding added; image_pe alike."""
        _, c, h, w = image.shape
        src = image.reshape(1, c, h * w).transpose(1, 2).contiguous()
        pe = image_pe.reshape(1, c, h * w).transpose(1, 2).contiguous()
        first = cast(TwoWayAttentionBlock, transformer.layers[0])
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        src_pe = src + pe
        return cls(
            src,
            pe,
            t2i._separate_heads(t2i.k_proj(src_pe)),
            t2i._separate_heads(t2i.v_proj(src)),
            i2t.q_proj(src_pe[0]).reshape(h * w, i2t.num_heads, -1).transpose(0, 1),
        )

    def attend(self, attn: Attention, queries: Tensor) -> Tensor:
        """The first token->image attention (``attn``) of queries (N, T, C) -> (N, T, C)."""
        n, t, c = queries.shape
        # Keys and values are the same for every prompt: all prompts' queries go in as one batch.
        q = attn._separate_heads(attn.q_proj(queries.reshape(1, n * t, c)))
        out = F.scaled_dot_product_attention(q, self.keys, self.values)
        return attn.out_proj(attn._recombine_heads(out)).reshape(n, t, c)


def prepare_shared(decoder: MaskDecoder, shared: SharedImage) -> None:
    """Compute now what the streamed decoder computes from the image alone on first use:
    ``_AfterShared``'s projections of the tokens after the first layer and ``_FirstConv``'s
    per-image part. Decoder passes on two threads (``passes.py``) would both compute them."""
    transformer = decoder.transformer
    layers = [cast(TwoWayAttentionBlock, layer) for layer in transformer.layers]
    norm = layers[0].norm4
    after = layers[1].cross_attn_token_to_image if len(layers) > 1 else transformer.final_attn_token_to_image
    _after_first_layer(shared, norm, after.k_proj, after.num_heads, pe=True)
    _after_first_layer(shared, norm, after.v_proj, after.num_heads, pe=False)
    if len(layers) > 1:
        queries = layers[1].cross_attn_image_to_token
        _after_first_layer(shared, norm, queries.q_proj, queries.num_heads, pe=True)
    if shared.first_conv is None and decoder_streamable(decoder):
        w1 = _Upscaler(decoder.output_upscaling).w1
        shared.first_conv = _centre(shared.src) @ _unrolled(w1, [layer.norm4 for layer in layers])[0]


def _token_self_attention(layer: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor) -> Tensor:
    """A two-way block's first step, on the prompt tokens only: self-attention (+ residual
    unless it is the first layer), norm1 (``TwoWayAttentionBlock.forward``)."""
    if layer.skip_first_layer_pe:
        return layer.norm1(layer.self_attn(queries, queries, queries))
    q = queries + query_pe
    return layer.norm1(queries + layer.self_attn(q, q, queries))


def _token_update(layer: TwoWayAttentionBlock, queries: Tensor, token_to_image: Tensor) -> Tensor:
    """A two-way block's norm2 and MLP steps, given its token->image attention's output."""
    queries = layer.norm2(queries + token_to_image)
    return layer.norm3(queries + layer.mlp(queries))


def can_stream(decoder: MaskDecoder, image_embeddings: Tensor, dense: Tensor) -> bool:
    """Whether the decode backend streams these inputs: inference (no autograd; training reaches
    the streamed form through ``decode_prompts``), not traced or compiled (``_traced``), one image
    shared by all prompts and no per-prompt dense (mask) embedding. ``decoder_streamable`` checks
    the decoder's configuration."""
    return (
        not torch.is_grad_enabled()
        and not _traced()
        and image_embeddings.shape[0] == 1
        and dense.shape[0] == 1
    )


def _traced() -> bool:
    """Under tracing, ONNX export or ``torch.compile``, which fuse the module path themselves (and
    would recompile for the streamed form's per-image state)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def decoder_streamable(decoder: nn.Module) -> bool:
    """Whether the streamed decoder computes this decoder's function: SAM's upscaling path
    (two 2x2 stride-2 transposed convolutions around a LayerNorm2d, each followed by an
    elementwise activation, see ``_Upscaler``) and a two-way transformer with at least one layer."""
    from ..models.layers import LayerNorm2d

    up = list(getattr(decoder, "output_upscaling", ()))
    if len(up) != 5 or len(getattr(decoder.transformer, "layers", ())) == 0:
        return False
    conv1, norm, _, conv2, _ = up
    return (
        all(
            isinstance(c, nn.ConvTranspose2d)
            and c.kernel_size == (2, 2)
            and c.stride == (2, 2)
            and c.padding == (0, 0)
            and c.output_padding == (0, 0)
            and c.groups == 1
            and c.dilation == (1, 1)
            and c.bias is not None
            for c in (conv1, conv2)
        )
        and isinstance(norm, LayerNorm2d)
        and all(isinstance(a, (nn.GELU, nn.ReLU)) for a in (up[2], up[4]))
    )


def stream_transformer(
    transformer: TwoWayTransformer,
    image: Tensor,
    image_pe: Tensor,
    tokens: Tensor,
    read_out: list[int],
    shared: SharedImage | None = None,
    *,
    keep_tiles: bool = False,
) -> tuple[Tensor, StreamedTokens]:
    """``TwoWayTransformer.forward`` for N prompts on one image, streamed (see module doc).

    Args:
      image: (1, C, H, W) image embedding with the dense prompt embedding added; image_pe alike.
      tokens: (N, T, C) output + prompt tokens.
      read_out: token positions whose final queries are wanted (the final attention is
        computed for those only).
      shared: ``SharedImage.compute(transformer, image, image_pe)``, if already at hand.
      keep_tiles: keep the final image tokens themselves too (``StreamedTokens.tiles``).
    Returns:
      queries (N, len(read_out), C) and the final image tokens (``StreamedTokens``).
    """
    if not transformer.layers:
        raise ValueError("stream_transformer needs a transformer with at least one layer")
    n = tokens.shape[0]
    _, c, h, w = image.shape
    hw = h * w
    if shared is None:
        shared = SharedImage.compute(transformer, image, image_pe)
    src, pe = shared.src, shared.pe
    # Tiles of whole rows of the token grid. Under autograd one tile: every tile's activations
    # are kept for the backward anyway, and the backward of each slice of a shared tensor writes
    # a full-size gradient.
    rows = hw if torch.is_grad_enabled() else max(1, TILE_ELEMENTS // (c * n * w)) * w
    tiles = [slice(i, min(i + rows, hw)) for i in range(0, hw, rows)]

    query_pe = tokens
    layers = [cast(TwoWayAttentionBlock, layer) for layer in transformer.layers]
    first = layers[0]
    queries = _token_self_attention(first, tokens, query_pe)
    queries = _token_update(
        first, queries, shared.attend(first.cross_attn_token_to_image, queries + query_pe)
    )

    x: list[Tensor] | None = None  # per-prompt image tokens, (N, R, C) per tile; None while shared
    x_pe: list[Tensor] = []  # the same plus the positional encoding (from the third layer on)
    after: _AfterShared | None = None  # the tokens after the first layer, in low-rank form
    records = []
    for i, layer in enumerate(layers):
        i2t = _ImageAttention.start(
            layer.cross_attn_image_to_token,
            layer.norm4,
            queries + query_pe,
            queries,
            fold_queries=x is not None and after is None,
        )
        records.append(_LayerRecord(layer.norm4, i2t.values))
        # the first layer's image tokens are the same for every prompt, their queries too
        shared_q = shared.queries if x is None else None
        logits = None
        if after is not None:  # the second layer's image->token logits, from the low-rank form
            qa = layer.cross_attn_image_to_token
            logits = after.logits(i2t.keys, qa.q_proj)
        last = i == len(layers) - 1
        if last:  # the final attention, for the read-out tokens only (its query rows are independent)
            next_q, attn = queries[:, read_out], transformer.final_attn_token_to_image
            next_in = next_q + query_pe[:, read_out]
        else:
            next_q = _token_self_attention(layers[i + 1], queries, query_pe)
            attn, next_in = layers[i + 1].cross_attn_token_to_image, next_q + query_pe
        t2i = None if x is None else _TokenAttention(attn, next_in)
        keep = not last or keep_tiles  # for the next layer; after the last, only where asked for
        out, out_pe = [], []
        for k, sl in enumerate(tiles):
            if x is None:
                assert shared_q is not None
                tile, p, rstd = i2t.apply(src[:, sl], None, shared_q[:, sl])
            elif logits is not None:
                tile, p, rstd = i2t.apply(x[k], None, logits=logits[:, :, sl])
            else:
                tile, p, rstd = i2t.apply(x[k], x_pe[k])
            records[-1].probs.append(p)
            records[-1].rstd.append(rstd)
            if keep:
                out.append(tile)
            if t2i is not None:
                keys = tile + pe[:, sl]
                t2i.add_tile(keys, tile)
                if not last:  # a third layer on reads them (``i2t.apply`` above)
                    out_pe.append(keys)
        if t2i is None:  # after the first layer: the next attention reads the low-rank form
            after = _AfterShared(shared, records[-1])
            attended = after.attend(attn, next_in)
        else:
            after, attended = None, t2i.finish()
        x, x_pe = out, out_pe
        if last:
            queries = transformer.norm_final_attn(next_q + attended)
        else:
            queries = _token_update(layers[i + 1], next_q, attended)
    return queries, StreamedTokens(tiles, shared, records, x if keep_tiles else None)


def stream_decode(
    decoder: MaskDecoder,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor,
    mask_slice: slice,
    shared: SharedImage | None = None,
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` for N prompts sharing one image embedding (see module doc).

    Args:
      image_embeddings: (1, C, H, W); image_pe: (1, C, H, W).
      sparse_prompt_embeddings: (N, T, C); dense_prompt_embeddings: broadcastable to (1, C, H, W).
      mask_slice: which mask tokens to decode.
      shared: ``SharedImage.compute(decoder.transformer, image_embeddings + dense, image_pe)``,
        if already at hand.
    Returns:
      mask logits (N, M, 4H, 4W) and IoU predictions (N, M).
    """
    tokens = decoder.prompt_tokens(sparse_prompt_embeddings)
    mask_ids = list(range(decoder.num_mask_tokens))[mask_slice]
    read_out = [0] + [1 + i for i in mask_ids]  # the IoU token and the decoded mask tokens
    image = image_embeddings + dense_prompt_embeddings
    queries, image_tokens = stream_transformer(decoder.transformer, image, image_pe, tokens, read_out, shared)

    iou_pred = decoder.iou_prediction_head(queries[:, 0])[:, mask_slice]
    hyper = torch.stack(
        [decoder.output_hypernetworks_mlps[j](queries[:, 1 + k]) for k, j in enumerate(mask_ids)], dim=1
    )  # (N, M, C2)
    grid = (image_embeddings.shape[-2], image_embeddings.shape[-1])
    return upscale_tiles(decoder, image_tokens, hyper, grid), iou_pred


def upscale_tiles(
    decoder: MaskDecoder,
    tokens: StreamedTokens,
    hyper: Tensor,
    grid: tuple[int, int],
    extent: tuple[int, int] | None = None,
) -> Tensor:
    """The mask head on streamed image tokens covering the (H, W) token grid row by row, with
    hypernetwork vectors (N, M, C2) -> mask logits (N, M, 4H, 4W).

    ``extent`` (rows, columns): only the mask logits ``[:rows, :cols]`` are needed (an image
    that leaves part of the prompt frame to padding; ``upscale.read_extent``). The tokens whose
    logits lie wholly outside are then skipped and their logits returned as zeros."""
    h, w = grid
    n, m = hyper.shape[:2]
    up = _Upscaler(decoder.output_upscaling)
    first = _FirstConv(up, tokens)
    rows, cols = h, w
    if extent is not None:  # each token makes a 4 x 4 block of logits
        rows, cols = min(h, -(-extent[0] // 4)), min(w, -(-extent[1] // 4))
    # Tiles are whole rows of tokens, so each lands in its own block of mask rows.
    full = rows == h and cols == w
    masks = hyper.new_empty(n, m, h, 2, 2, w, 2, 2) if full else hyper.new_zeros(n, m, h, 2, 2, w, 2, 2)
    for k, sl in enumerate(tokens.rows):
        if sl.start // w >= rows:
            break
        block = masks[:, :, sl.start // w : sl.stop // w, :, :, :cols]
        up.rest(first.tile(k, sl, w, cols), hyper, block)
    return masks.reshape(n, m, 4 * h, 4 * w)


def decode_prompts(
    sam: Sam,
    image_embedding: Tensor,
    *,
    point_coords: Tensor | None = None,
    point_labels: Tensor | None = None,
    boxes: Tensor | None = None,
    multimask_output: bool = True,
) -> tuple[Tensor, Tensor]:
    """``Sam.decode`` of N prompts (no mask inputs) on one image embedding (1, C, H, W), with or
    without autograd: through ``stream_decode`` on a CPU where the decoder streams, else through
    the module. Same values and gradients up to float rounding. The training commands decode
    through this, so a CPU training step runs the decoder's cheaper form forward and backward.
    """
    decoder = sam.mask_decoder
    if not (
        image_embedding.device.type == "cpu"
        and image_embedding.shape[0] == 1
        and decoder_streamable(decoder)
        and not _traced()
    ):
        return sam.decode(
            image_embedding,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            multimask_output=multimask_output,
        )
    points = (point_coords, point_labels) if point_coords is not None else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return stream_decode(
        decoder, image_embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, mask_slice
    )
