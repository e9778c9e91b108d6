"""Inference-time rewrites keep the plain path's numerics (fp32) and leave the model alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from evsam_cli.models import create_model
from evsam_cli.models.layers import ConvNormAct, LayerNorm2d
from evsam_cli.models.optimize import fold_conv_bn, optimize_encoder
from evsam_cli.models.transformer import Attention
from evsam_cli.predictor import SamPredictor


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


@pytest.mark.parametrize("image_batch", [1, 5])
def test_factorised_cross_attention_equals_plain_attention(image_batch):
    torch.manual_seed(0)
    attn = Attention(256, 8, downsample_rate=2)
    tokens = torch.randn(5, 7, 256)
    image = torch.randn(image_batch, 4096 // 16, 256)
    image_pe = torch.randn(1, 4096 // 16, 256)
    k = image + image_pe
    img_n = image.expand(5, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            attn.tokens_to_image(tokens, k.expand(5, -1, -1), img_n),
            attn(tokens, k, image),
            rtol=1e-4,
            atol=1e-5,
        )
        torch.testing.assert_close(
            attn.image_to_tokens(k, tokens, tokens), attn(k, tokens, tokens), rtol=1e-4, atol=1e-5
        )


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
