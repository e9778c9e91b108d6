"""Inference-time rewrites keep the plain path's numerics (fp32) and leave the model alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evsam_cli.accel import streaming
from evsam_cli.accel.backend import CpuBackend, ReferenceBackend, cpu_backend_applies, select_backend
from evsam_cli.accel.encoder import (
    FusedConvAct,
    MatmulResize,
    bicubic_matrix,
    cpu_kernels_available,
    fold_conv_bn,
    optimize_encoder,
    winograd_pays,
)
from evsam_cli.accel.streaming import (
    SharedImage,
    can_stream,
    decoder_streamable,
    prepare_shared,
    stream_decode,
    stream_transformer,
)
from evsam_cli.accel.winograd import WinogradConv2d, transform_filters, winograd_conv3x3
from evsam_cli.models import create_model
from evsam_cli.models.layers import ConvNormAct, LayerNorm2d, Upsample
from evsam_cli.predictor.sam_predictor import SamPredictor


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.normal_(1.0, 0.2)
            m.bias.data.normal_(0.0, 0.2)


def test_fold_conv_bn_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=True)
    bn = nn.BatchNorm2d(16, eps=1e-6).eval()
    _randomize_bn(bn)
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientvit-sam-l0", "efficientvit-sam-xl0"])
def test_optimized_encoder_matches_plain_and_model_is_untouched(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=128)
    _randomize_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_encoder(model.image_encoder)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref, out = model.image_encoder(x), fast(x)
    assert out.is_contiguous()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, ConvNormAct) and isinstance(m.norm, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    if cpu_kernels_available():  # the neck's 256-wide 3x3 convs by Winograd, every other conv fused
        assert any(isinstance(m, WinogradConv2d) for m in fast.modules())
        assert any(isinstance(m, FusedConvAct) for m in fast.modules())
        assert not any(isinstance(m, ConvNormAct) for m in fast.modules())
    assert not any(isinstance(m, Upsample) for m in fast.modules())
    assert any(isinstance(m, MatmulResize) for m in fast.modules())
    plain = optimize_encoder(model.image_encoder, cpu_kernels=False)
    assert not any(isinstance(m, WinogradConv2d | FusedConvAct) for m in plain.modules())
    for_compile = optimize_encoder(model.image_encoder, cpu_kernels=False, matmul_resize=False)
    assert any(isinstance(m, Upsample) for m in for_compile.modules())
    with torch.no_grad():
        out = for_compile(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize(("out_size", "in_size"), [(64, 16), (64, 32), (7, 3), (5, 9), (64, 64)])
def test_bicubic_matrix_has_interpolate_weights(out_size, in_size):
    x = torch.randn(1, 1, in_size, in_size, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, (out_size, out_size), mode="bicubic", align_corners=False)
    w = torch.from_numpy(bicubic_matrix(out_size, in_size))
    torch.testing.assert_close(w @ x[0, 0] @ w.T, ref[0, 0], rtol=0, atol=1e-12)


def test_matmul_resize_equals_upsample():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 12).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(MatmulResize(64)(x), Upsample(64)(x), rtol=0, atol=1e-5)
    same = torch.randn(1, 4, 64, 64)
    assert MatmulResize(64)(same) is same


@pytest.mark.parametrize("shape", [(1, 192, 16, 16), (2, 8, 13, 10), (1, 16, 5, 7), (2, 8, 19, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 2])
def test_winograd_conv_equals_direct_convolution(shape, channels_last, chunk_rows):
    """F(4x4, 3x3) equals the direct convolution up to float rounding, for sizes that are and are
    not multiples of the 4x4 output tile, in either memory format, with and without bias, done
    at once or in chunks of tile rows (one row each, or two with a shorter last chunk)."""
    torch.manual_seed(0)
    b, c, h, w = shape
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(24, c, 3, 3) / (9 * c) ** 0.5
    bias = torch.randn(24)
    for bias_ in (bias, None):
        ref = torch.nn.functional.conv2d(x, weight, bias_, padding=1)
        chunking = {}
        if chunk_rows is not None:  # the transformed output of `chunk_rows` rows of 4x4 tiles
            chunking["chunk_bytes"] = chunk_rows * 36 * b * -(-w // 4) * 24 * 4
        out = winograd_conv3x3(x, transform_filters(weight), bias_, **chunking)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()])
def test_winograd_module_applies_the_activation(act):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 9, 12)
    with torch.no_grad():
        ref = conv(x) if act is None else act(conv(x))
        out = WinogradConv2d(conv, act)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="stride-1 3x3"):
        WinogradConv2d(nn.Conv2d(16, 8, 3, stride=2, padding=1))


def test_winograd_is_chosen_for_the_wide_dense_3x3_convolutions():
    """Only where it was measured faster: 128 input channels and up, and wide enough overall."""
    wide = [(256, 1024), (256, 256), (128, 512), (128, 256), (192, 192)]
    narrow = [(128, 128), (64, 256), (64, 64), (32, 512)]
    assert all(winograd_pays(nn.Conv2d(i, o, 3, padding=1)) for i, o in wide)
    assert not any(winograd_pays(nn.Conv2d(i, o, 3, padding=1)) for i, o in narrow)
    assert not winograd_pays(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not winograd_pays(nn.Conv2d(256, 256, 3, padding=1, groups=256))
    assert not winograd_pays(nn.Conv2d(256, 256, 1))


@pytest.mark.skipif(not cpu_kernels_available(), reason="this PyTorch build has no oneDNN conv ops")
@pytest.mark.parametrize(
    "act", [None, nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh")], ids=["none", "relu", "gelu", "tanh"]
)
@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 1), (3, 8)])
def test_fused_conv_act_equals_conv_then_act(act, kernel, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, kernel, padding=kernel // 2, groups=groups)
    fused = FusedConvAct(conv, act)
    plain = (lambda y: y) if act is None else act
    for shape in [(1, 16, 12, 12), (2, 16, 7, 9)]:  # the weight is packed once, then reused
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref, out = plain(conv(x)), fused(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # With autograd it falls back to the plain modules, so gradients still flow.
    x = torch.randn(1, 16, 6, 6, requires_grad=True)
    fused(x).sum().backward()
    assert x.grad is not None


def test_sam_vit_is_not_copied():
    with torch.device("meta"):
        model = create_model("sam-vit-b", device="meta")
    assert optimize_encoder(model.image_encoder) is model.image_encoder


def test_predictor_optimized_equals_plain(small_model, scene):
    image, _ = scene
    a, b = SamPredictor(small_model, optimize=True), SamPredictor(small_model, optimize=False)
    a.set_image(image)
    b.set_image(image)
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-4)
    box = np.array([80, 45, 160, 135])
    ma, sa, _ = a.predict(box=box, return_logits=True)
    mb, sb, _ = b.predict(box=box, return_logits=True)
    np.testing.assert_allclose(ma, mb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(sa, sb, atol=1e-4)


def test_cpu_backend_equals_reference_backend(small_model, scene):
    """The predictor's two decode backends: same masks, scores and low-res logits, for boxes,
    points and mask inputs (the CPU backend's module path)."""
    image, _ = scene
    a = SamPredictor(small_model, backend="cpu")
    b = SamPredictor(small_model, backend="reference", optimize=False)
    assert isinstance(a.backend, CpuBackend) and type(b.backend) is ReferenceBackend
    a.set_image(image)
    b.set_image(image)
    boxes = np.array([[80, 45, 160, 135], [10, 10, 60, 90]])
    for kwargs in (
        {"boxes": boxes},
        {"point_coords": np.array([[[100, 80]], [[30, 40]]]), "point_labels": np.ones((2, 1))},
    ):
        ma, sa, la = a.predict_batch(**kwargs, return_logits=True)
        mb, sb, lb = b.predict_batch(**kwargs, return_logits=True)
        np.testing.assert_allclose(la, lb, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(ma, mb, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(sa, sb, atol=1e-4)
        binary = a.predict_batch(**kwargs)[0]
        assert (binary == (mb > 0)).mean() > 0.999
        best_a = a.predict_best(**kwargs).numpy()
        best_b = b.predict_best(**kwargs).numpy()
        assert (best_a == best_b).mean() > 0.999
    ma, sa, _ = a.predict(box=boxes[0], mask_input=la[:1, :1][0], return_logits=True)
    mb, sb, _ = b.predict(box=boxes[0], mask_input=la[:1, :1][0], return_logits=True)
    np.testing.assert_allclose(ma, mb, rtol=1e-3, atol=1e-3)


def test_mask_head_for_one_output_per_prompt(small_model, scene):
    """The CPU backend's mask head for one chosen output per prompt (``predict_best``'s: only that
    output's hypernetwork product is made) equals picking it from the mask head run for every
    output, for prompts in any order; a prompt asked for twice takes the general path."""
    image, _ = scene
    pred = SamPredictor(small_model, backend="cpu")
    pred.set_image(image)
    boxes = np.array([[80, 45, 160, 135], [10, 10, 60, 90], [30, 20, 120, 100], [0, 0, 50, 50]])
    inputs = pred._tensors(pred._prompts(None, None, boxes, None))
    backend = pred.backend
    with torch.inference_mode():
        _, tokens = backend.decode_tokens(boxes=inputs["boxes"])
        for prompt_idx, token_idx in (([2, 0, 3], [1, 0, 2]), ([0, 1, 2, 3], [2, 2, 0, 1]), ([1, 1], [0, 2])):
            p, t = torch.tensor(prompt_idx), torch.tensor(token_idx)
            got = backend.mask_logits(tokens, p, t)
            want = ReferenceBackend.mask_logits(backend, tokens, p, t)  # every output, then the chosen
            assert got.shape == (len(prompt_idx), 256, 256)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("shape", [(180, 240), (240, 150), (200, 200)])
def test_mask_head_skips_the_frame_padding(small_model, shape):
    """With the extent the upscaling reads, the CPU backend's mask head computes the logits of
    the image's part of the prompt frame only: equal to the full head's there, zeros in the
    padding (which no upscaling weighs), and ``predict_best`` makes the same masks as the
    reference backend, for landscape, portrait and square images."""
    image = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
    pred = SamPredictor(small_model, backend="cpu")
    reference = SamPredictor(small_model, backend="reference", optimize=False)
    for p in (pred, reference):
        p.set_image(image)
    boxes = np.array([[10, 20, 120, 140], [30, 10, 140, 100], [0, 0, 100, 80]])
    inputs = pred._tensors(pred._prompts(None, None, boxes, None))
    backend = pred.backend
    assert pred.input_size is not None and pred.original_size is not None
    extent = backend.read_extent((256, 256), pred.input_size, pred.original_size)
    if shape[0] != shape[1]:
        assert min(extent) < 256  # some of the frame is padding
    with torch.inference_mode():
        _, tokens = backend.decode_tokens(boxes=inputs["boxes"])
        p, t = torch.arange(3), torch.tensor([2, 0, 1])
        full = backend.mask_logits(tokens, p, t)
        cut = backend.mask_logits(tokens, p, t, extent=extent)
    rows, cols = extent
    torch.testing.assert_close(cut[:, :rows, :cols], full[:, :rows, :cols], rtol=1e-6, atol=1e-5)
    # whole tokens (4 x 4 logits) are skipped: columns token by token, rows tile by tile
    assert not cut[:, :, -(-cols // 4) * 4 :].any()
    if rows < 200:
        assert not cut[:, -4:].any()
    got = pred.predict_best(boxes=boxes).numpy()
    want = reference.predict_best(boxes=boxes).numpy()
    assert (got == want).mean() > 0.999


def test_backend_selection():
    model = create_model("efficientvit-sam-l0", input_size=64)
    assert cpu_backend_applies(model)
    assert isinstance(select_backend(model), CpuBackend)
    assert type(select_backend(model, "reference")) is ReferenceBackend
    with pytest.raises(ValueError, match="unknown decode backend"):
        select_backend(model, "fast")
    assert decoder_streamable(model.mask_decoder)
    model.mask_decoder.output_upscaling[0] = nn.ConvTranspose2d(256, 64, kernel_size=4, stride=4)
    assert not decoder_streamable(model.mask_decoder)  # not SAM's 2x2 stride-2 upscaling
    assert type(select_backend(model)) is ReferenceBackend
    with pytest.raises(ValueError, match="mask decoder"):
        CpuBackend(model)


def test_layernorm2d_matches_definition():
    torch.manual_seed(0)
    ln = LayerNorm2d(16, eps=1e-6)
    ln.weight.data.normal_()
    ln.bias.data.normal_()
    x = torch.randn(3, 16, 9, 7) * 5 + 2
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    ref = (x - u) / torch.sqrt(s + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    half = ln(x.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def _spread_weights(module: nn.Module) -> None:
    """Random weights large enough that every path of the decoder matters in the output."""
    for p in module.parameters():
        p.data.normal_(0.0, 0.08 if p.dim() > 1 else 0.2)


@pytest.mark.parametrize(
    ("prompt", "multimask", "offset"),
    [(p, m, 0.0) for p in ("boxes", "points", "both") for m in (True, False)] + [("boxes", True, 5.0)],
)
def test_streamed_decoder_equals_module_path(prompt, multimask, offset):
    """Also for an image embedding far from zero mean (the low-rank forms of the tokens after
    the first layer subtract large shared terms)."""
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    _spread_weights(model.mask_decoder)
    _spread_weights(model.prompt_encoder)
    n = 5
    xy = torch.rand(n, 2) * 700
    boxes = torch.cat([xy, xy + 50 + torch.rand(n, 2) * 200], dim=1) if prompt != "points" else None
    coords = torch.rand(n, 3, 2) * 1000 if prompt != "boxes" else None
    labels = torch.tensor([[1, 0, 1]]).repeat(n, 1) if prompt != "boxes" else None
    sparse, dense = model.prompt_encoder(
        points=None if coords is None else (coords, labels), boxes=boxes, masks=None
    )
    emb = torch.randn(1, 256, 64, 64) + offset
    pe = model.prompt_encoder.get_dense_pe()
    dec = model.mask_decoder
    assert can_stream(dec, emb, dense) is False  # autograd on: the module path
    ref_masks, ref_iou = dec(emb, pe, sparse, dense, multimask)
    with torch.no_grad():
        assert can_stream(dec, emb, dense)
        masks, iou = stream_decode(dec, emb, pe, sparse, dense, slice(1, None) if multimask else slice(0, 1))
        backend = CpuBackend(model)
        backend.set_embedding(emb)
        via_backend = backend.decode(
            point_coords=coords, point_labels=labels, boxes=boxes, multimask_output=multimask
        )
    assert masks.shape == ref_masks.shape == (n, 3 if multimask else 1, 256, 256)
    scale = float(ref_masks.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(masks, ref_masks.detach(), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(iou, ref_iou.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(via_backend[0], masks, rtol=0, atol=0)
    torch.testing.assert_close(via_backend[1], iou, rtol=0, atol=0)


def test_prepared_image_state_is_what_decoding_computes():
    """``prepare_shared`` computes exactly the per-image products a decode would compute on first
    use (so the CPU backend's two decode threads find them all made), with the same values."""
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    _spread_weights(model.mask_decoder)
    dec = model.mask_decoder
    image, pe = torch.randn(1, 256, 64, 64), model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=None, boxes=torch.tensor([[10.0, 20, 300, 400]]), masks=None
        )
        prepared = SharedImage.compute(dec.transformer, image + dense, pe)
        prepare_shared(dec, prepared)
        made = dict(prepared.derived)
        lazy = SharedImage.compute(dec.transformer, image + dense, pe)
        want = stream_decode(dec, image, pe, sparse, dense, slice(1, None), lazy)
        got = stream_decode(dec, image, pe, sparse, dense, slice(1, None), prepared)
    assert set(made) == set(lazy.derived) and set(prepared.derived) == set(made)  # nothing more
    for name, tensor in made.items():
        assert prepared.derived[name] is tensor
        torch.testing.assert_close(tensor, lazy.derived[name], rtol=1e-6, atol=1e-6)
    assert prepared.first_conv is not None and lazy.first_conv is not None
    torch.testing.assert_close(prepared.first_conv, lazy.first_conv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_first_mask_convolution_expanded_through_the_transformer(offset):
    """The per-image + low-rank form of the mask head's first convolution equals the convolution
    of the explicit image tokens, tile by tile, also for prompt subsets and for an image
    embedding far from zero mean (the form subtracts large shared terms)."""
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    _spread_weights(model.mask_decoder)
    dec = model.mask_decoder
    image = torch.randn(1, 256, 64, 64) + offset
    pe = model.prompt_encoder.get_dense_pe()
    tokens = torch.randn(6, 7, 256)
    with torch.no_grad():
        _, streamed = stream_transformer(dec.transformer, image, pe, tokens, [0, 1], keep_tiles=True)
        up = streaming._Upscaler(dec.output_upscaling)
        for ids in (torch.arange(6), torch.tensor([4, 1])):
            subset = streamed.select(ids)
            first = streaming._FirstConv(up, subset)
            start = 0
            assert len(subset.tiles) > 1
            for k, tile in enumerate(subset.tiles):
                # the first convolution as the per-token linear map it is
                want = torch.addmm(up.b1, tile.reshape(-1, tile.shape[2]), up.w1).reshape(*tile.shape[:2], -1)
                got = first.tile(k, slice(start, start + tile.shape[1]), 64, 64)
                torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))
                # the first 41 tokens of each row of 64 only (an image leaving the rest to padding)
                left = first.tile(k, slice(start, start + tile.shape[1]), 64, 41)
                want = want.unflatten(1, (-1, 64))[:, :, :41].flatten(1, 2)
                torch.testing.assert_close(left, want, rtol=0, atol=2e-5 * float(want.abs().max()))
                start += tile.shape[1]


def test_decoder_streams_only_shared_inference(monkeypatch):
    model = create_model("efficientvit-sam-l0", input_size=128)
    emb = torch.zeros(1, 256, 64, 64)
    with torch.no_grad():
        assert can_stream(model.mask_decoder, emb, torch.zeros(1, 256, 1, 1))
        assert not can_stream(model.mask_decoder, emb, torch.zeros(3, 256, 64, 64))  # mask inputs
        assert not can_stream(model.mask_decoder, torch.zeros(3, 256, 64, 64), torch.zeros(1, 256, 1, 1))
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # under torch.compile
        assert not can_stream(model.mask_decoder, emb, torch.zeros(1, 256, 1, 1))


@pytest.mark.parametrize(
    ("frame", "original"),
    [((768, 1024), (480, 640)), ((1024, 683), (1500, 1000)), ((1024, 1024), (64, 64)), ((5, 1024), (4, 900))],
)
def test_postprocess_upsamples_only_the_image_part_identically(frame, original):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    low = torch.randn(2, 3, 256, 256) * 4
    full = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[..., : frame[0], : frame[1]]
    ref = F.interpolate(full, original, mode="bilinear", align_corners=False)
    assert torch.equal(model.postprocess_masks(low, frame, original), ref)


def test_backend_keeps_the_image_part_until_the_image_changes(monkeypatch):
    """The CPU backend computes what the streamed decoder needs from the image alone once per
    ``set_embedding``; it works on copies of the weights, so changing the model's weights
    afterwards changes nothing, and the outputs always equal a fresh backend's."""
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    _spread_weights(model.mask_decoder)
    computed = []
    compute = SharedImage.compute.__func__
    monkeypatch.setattr(
        SharedImage, "compute", classmethod(lambda cls, *args: computed.append(1) or compute(cls, *args))
    )
    emb = torch.randn(1, 256, 64, 64)
    box = torch.tensor([[10.0, 20, 300, 400]])
    backend = CpuBackend(model)

    def decode(b=backend):
        with torch.no_grad():
            return b.decode(boxes=box)

    backend.set_embedding(emb)
    first = decode()
    assert len(computed) == 1
    torch.testing.assert_close(decode()[0], first[0], rtol=0, atol=0)
    assert len(computed) == 1  # same image: reused
    with torch.no_grad():
        model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
    torch.testing.assert_close(decode()[0], first[0], rtol=0, atol=0)  # a copy of the weights
    backend.set_embedding(emb + 0.5)
    got = decode()
    assert len(computed) == 2
    fresh = CpuBackend(model)
    fresh.set_embedding(emb + 0.5)
    want = decode(fresh)  # also sees the changed weight
    assert not torch.equal(got[0], first[0]) and not torch.equal(want[0], got[0])
    ref = ReferenceBackend(model)
    ref.set_embedding(emb + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            ref.decode(boxes=box)[0], want[0], rtol=0, atol=1e-5 * float(want[0].abs().max())
        )


@pytest.mark.parametrize("depth", [1, 3])
def test_streamed_transformer_of_other_depths(depth):
    """SAM's decoder has two layers; the streamed form (low-rank after the first layer, tiles
    after that) holds for one and for three as well."""
    from evsam_cli.models.transformer import TwoWayTransformer

    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=depth, embedding_dim=256, num_heads=8, mlp_dim=512).eval()
    _spread_weights(transformer)
    image, pe, tokens = torch.randn(1, 256, 64, 64) + 2, torch.randn(1, 256, 64, 64), torch.randn(3, 7, 256)
    with torch.no_grad():
        hs, keys = transformer(image, pe, tokens)
        streamed_hs, streamed = stream_transformer(
            transformer, image, pe, tokens, list(range(7)), keep_tiles=True
        )
        assert stream_transformer(transformer, image, pe, tokens, [0])[1].tiles is None  # not kept unasked
    torch.testing.assert_close(streamed_hs, hs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(streamed.tiles, 1), keys, rtol=1e-5, atol=1e-5)


def test_layer_norm_with_rstd_gradients():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    fn = streaming._LayerNormWithRstd.apply
    assert torch.autograd.gradcheck(lambda *a: fn(*a, 1e-5), (x, w, b))
    y, rstd = fn(x, w, b, 1e-5)
    torch.testing.assert_close(y, nn.functional.layer_norm(x, (8,), w, b, 1e-5))
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(-1, correction=0, keepdim=True) + 1e-5))


@pytest.mark.parametrize(("prompt", "multimask"), [("boxes", True), ("points", False), ("both", True)])
def test_streamed_decoder_gradients_equal_module_path(prompt, multimask, monkeypatch):
    """Training decodes through the streamed form with autograd (``decode_prompts``): the
    gradients of every decoder parameter and of the image embedding are the module path's, in
    float64 (the module's LayerNorm2d, float32 inside for fp16's sake, computed in float64 here)."""

    def layer_norm_2d(self, x):
        y = nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return y.permute(0, 3, 1, 2)

    monkeypatch.setattr(LayerNorm2d, "forward", layer_norm_2d)
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    _spread_weights(model.mask_decoder)
    dec = model.mask_decoder.double()
    n = 4
    xy = torch.rand(n, 2) * 700
    boxes = torch.cat([xy, xy + 50 + torch.rand(n, 2) * 200], dim=1) if prompt != "points" else None
    coords = torch.rand(n, 3, 2) * 1000 if prompt != "boxes" else None
    labels = torch.tensor([[1, 0, 1]]).repeat(n, 1) if prompt != "boxes" else None
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=None if coords is None else (coords, labels), boxes=boxes, masks=None
        )
    sparse, dense = sparse.double(), dense.double()
    pe = model.prompt_encoder.get_dense_pe().double()
    emb0 = torch.randn(1, 256, 64, 64, dtype=torch.float64) + 2.0
    grads = []
    for streamed in (False, True):
        dec.zero_grad(set_to_none=True)
        emb = emb0.clone().requires_grad_(True)
        if streamed:
            masks, iou = stream_decode(
                dec, emb, pe, sparse, dense, slice(1, None) if multimask else slice(0, 1)
            )
        else:
            masks, iou = dec(emb, pe, sparse, dense, multimask)
        weights = torch.linspace(-1.0, 1.0, masks.numel(), dtype=torch.float64).reshape(masks.shape)
        (
            (masks.tanh() * weights).sum()
            + (iou * torch.arange(1.0, iou.numel() + 1).reshape(iou.shape)).sum()
        ).backward()
        grads.append({"image embedding": emb.grad, **{k: p.grad for k, p in dec.named_parameters()}})
    ref, got = grads
    # the same parameters take part as in the module (not the unread outputs' hypernetworks)
    assert {k for k, g in got.items() if g is None} == {k for k, g in ref.items() if g is None}
    for name, want in ref.items():
        if want is None:
            continue
        scale = float(want.norm())
        if scale < 1e-9:  # the key biases: no effect on a softmax, zero gradient up to rounding
            assert float(got[name].norm()) < 1e-6, name
            continue
        assert float((got[name] - want).norm()) <= 1e-9 * scale, name


def test_training_decodes_through_the_streamed_form(monkeypatch):
    model = create_model("efficientvit-sam-l0", input_size=128)
    calls = []
    real = streaming.stream_decode
    monkeypatch.setattr(streaming, "stream_decode", lambda *a: calls.append(1) or real(*a))
    emb = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 900.0, 700.0]])
    masks, iou = streaming.decode_prompts(model, emb, boxes=boxes, multimask_output=True)
    assert calls and masks.requires_grad
    want_masks, want_iou = model.decode(emb, boxes=boxes, multimask_output=True)
    torch.testing.assert_close(masks, want_masks, rtol=0, atol=1e-5 * float(want_masks.abs().max()))
    torch.testing.assert_close(iou, want_iou, rtol=1e-5, atol=1e-6)
    calls.clear()
    streaming.decode_prompts(model, emb.expand(2, -1, -1, -1), boxes=boxes, multimask_output=False)
    assert not calls  # one embedding per prompt: the module path
