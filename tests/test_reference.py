"""Parity with the official implementations (EfficientViT-SAM and Meta's SAM code).

The package ``efficientsam==1.0.0`` is the official EfficientViT-SAM code (it also carries
Meta's ``segment_anything`` modules). It is a test-only dependency: the library never imports it.
Tolerance: 1e-4 relative on image embeddings and mask logits (fp32, CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evsam_cli.models import create_model
from evsam_cli.predictor.sam_predictor import SamPredictor

efficientsam = pytest.importorskip("efficientsam")
pytestmark = pytest.mark.reference

VARIANTS = [
    "efficientvit-sam-l0",
    "efficientvit-sam-l1",
    "efficientvit-sam-l2",
    "efficientvit-sam-xl0",
    "efficientvit-sam-xl1",
]


def _official(name: str):
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    torch.manual_seed(0)
    model = create_efficientvit_sam_model(name, pretrained=False).eval()
    for m in model.modules():  # make BatchNorm statistics matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1.0, 0.1)
            m.bias.data.normal_(0.0, 0.1)
    return model


def _rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = (
        torch.as_tensor(np.asarray(a), dtype=torch.float64),
        torch.as_tensor(np.asarray(b), dtype=torch.float64),
    )
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", VARIANTS)
def test_official_state_dict_keys_and_shapes_identical(name):
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    with torch.device("meta"):
        ref = create_efficientvit_sam_model(name, pretrained=False)
        ours = create_model(name, device="meta")
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape for k in ref_sd)


@pytest.mark.parametrize("name", ["efficientvit-sam-l0", "efficientvit-sam-xl0"])
def test_efficientvit_sam_matches_official_predictor(tmp_path, name):
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor

    ref = _official(name)
    path = tmp_path / "official.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    ours = create_model(name, checkpoint=path)

    rng = np.random.default_rng(0)
    image = (rng.random((300, 437, 3)) * 255).astype(np.uint8)
    ref_pred, our_pred = EfficientViTSamPredictor(ref), SamPredictor(ours)
    ref_pred.set_image(image)
    our_pred.set_image(image)
    assert _rel_err(our_pred.features, ref_pred.features) < 1e-4

    points, labels, box = np.array([[100, 50], [200, 150]]), np.array([1, 0]), np.array([20, 30, 300, 250])
    for kwargs in (
        {"point_coords": points, "point_labels": labels},
        {"box": box},
        {"point_coords": points, "point_labels": labels, "box": box},
    ):
        for multimask in (True, False):
            m1, s1, l1 = ref_pred.predict(**kwargs, multimask_output=multimask, return_logits=True)
            m2, s2, l2 = our_pred.predict(**kwargs, multimask_output=multimask, return_logits=True)
            assert m1.shape == m2.shape
            assert _rel_err(m2, m1) < 1e-4
            assert _rel_err(l2, l1) < 1e-4
            assert np.abs(s2 - s1).max() < 1e-4
    # Mask input from a previous round.
    m1, s1, _ = ref_pred.predict(
        point_coords=points, point_labels=labels, mask_input=l1[:1], multimask_output=False
    )
    m2, s2, _ = our_pred.predict(
        point_coords=points, point_labels=labels, mask_input=l2[:1], multimask_output=False
    )
    assert (m1 != m2).mean() < 1e-4 and np.abs(s2 - s1).max() < 1e-4


def _meta_sam_vit_b():
    from functools import partial

    from efficientsam.segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=12,
            embed_dim=768,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=12,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[2, 5, 8, 11],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    with torch.no_grad():  # Meta initialises these to zero; random values make them count
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.02)
            block.attn.rel_pos_w.normal_(0, 0.02)
        sam.image_encoder.pos_embed.normal_(0, 0.02)
    return sam


def test_sam_vit_b_matches_meta_predictor(tmp_path):
    from efficientsam.segment_anything import SamPredictor as MetaPredictor

    ref = _meta_sam_vit_b()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(ref.state_dict(), path)
    ours = create_model("sam-vit-b", checkpoint=path)

    rng = np.random.default_rng(1)
    image = (rng.random((240, 320, 3)) * 255).astype(np.uint8)
    ref_pred, our_pred = MetaPredictor(ref), SamPredictor(ours)
    ref_pred.set_image(image)
    our_pred.set_image(image)
    assert _rel_err(our_pred.features, ref_pred.features) < 1e-4
    box = np.array([30, 40, 200, 220])
    m1, s1, l1 = ref_pred.predict(box=box, multimask_output=True, return_logits=True)
    m2, s2, l2 = our_pred.predict(box=box, multimask_output=True, return_logits=True)
    assert _rel_err(m2, m1) < 1e-4 and _rel_err(l2, l1) < 1e-4 and np.abs(s2 - s1).max() < 1e-4
