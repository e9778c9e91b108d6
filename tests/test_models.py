"""The zoo: parameter counts, MACs, forward/backward shapes for every variant."""

from __future__ import annotations

import pytest
import torch

from evsam_cli.errors import UnknownModelError
from evsam_cli.models import create_model, get_spec, list_models, resolve_name
from evsam_cli.models.profile import profile_model

EFFICIENTVIT = [n for n in list_models() if n.startswith("efficientvit")]
PAPER_PARAMS_M = {
    "efficientvit-sam-l0": 34.8,
    "efficientvit-sam-l1": 47.7,
    "efficientvit-sam-l2": 61.3,
    "efficientvit-sam-xl0": 117.0,
    "efficientvit-sam-xl1": 203.3,
    "sam-vit-h": 641.1,
}
PAPER_MACS_G = {
    "efficientvit-sam-l0": 35,
    "efficientvit-sam-l1": 49,
    "efficientvit-sam-l2": 69,
    "efficientvit-sam-xl0": 185,
    "efficientvit-sam-xl1": 322,
}


def test_zoo_lists_ten_models():
    assert list_models() == [
        "efficientvit-sam-l0",
        "efficientvit-sam-l1",
        "efficientvit-sam-l2",
        "efficientvit-sam-xl0",
        "efficientvit-sam-xl1",
        "sam-vit-b",
        "sam-vit-l",
        "sam-vit-h",
        "mobile-sam",
        "lite-medsam",
    ]


@pytest.mark.parametrize(
    "alias,name",
    [
        ("l0", "efficientvit-sam-l0"),
        ("XL1", "efficientvit-sam-xl1"),
        ("vit_h", "sam-vit-h"),
        ("vit-b", "sam-vit-b"),
        ("mobile_sam", "mobile-sam"),
        ("lite_medsam", "lite-medsam"),
    ],
)
def test_aliases(alias, name):
    assert resolve_name(alias) == name


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError, match="efficientvit-sam-l0") as info:
        create_model("efficientvit-sam-l9")
    assert "unknown model 'efficientvit-sam-l9'" in str(info.value)


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_param_counts_match_paper(name):
    prof = profile_model(name)
    assert round(prof.params / 1e6, 1) == PAPER_PARAMS_M[name]
    assert get_spec(name).paper_params_m == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", list(PAPER_MACS_G))
def test_encoder_macs_match_paper(name):
    prof = profile_model(name)
    assert prof.input_size == get_spec(name).input_size
    assert round(prof.encoder_macs / 1e9) == PAPER_MACS_G[name]


@pytest.mark.parametrize("name", EFFICIENTVIT)
def test_efficientvit_forward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=64)
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, 256, 64, 64)
    assert torch.isfinite(emb).all()
    # LayerNorm2d output: zero mean / unit variance over channels before the affine (identity at init).
    assert emb.mean(dim=1).abs().max() < 1e-4


def test_native_input_sizes():
    assert create_model("l1").input_size == 512
    assert create_model("xl0").input_size == 1024
    assert create_model("sam-vit-b").input_size == 1024


# A real SAM ViT-B forward runs in tests/test_reference.py against Meta's implementation.
@pytest.mark.parametrize("name", ["sam-vit-b", "sam-vit-l", "sam-vit-h"])
def test_sam_vit_large_shapes_on_meta_device(name):
    with torch.device("meta"):
        model = get_spec(name).build()
        emb = model.image_encoder(torch.empty(1, 3, 1024, 1024))
    assert tuple(emb.shape) == (1, 256, 64, 64)


# TinyViT-5M (MobileSAM, LiteMedSAM): 5.7M encoder parameters (+0.32M of MobileSAM's unused
# ImageNet classifier, kept for its file's layout) and SAM's 4.1M head.
@pytest.mark.parametrize(
    "name,size,prompt_size,preprocessing,params_m",
    [("mobile-sam", 1024, 1024, "sam", 10.1), ("lite-medsam", 256, 256, "minmax-area", 9.8)],
)
def test_tiny_vit_sams_on_meta_device(name, size, prompt_size, preprocessing, params_m):
    with torch.device("meta"):
        model = get_spec(name).build()
        emb = model.image_encoder(torch.empty(1, 3, size, size))
    assert tuple(emb.shape) == (1, 256, 64, 64)
    assert (model.input_size, model.prompt_size, model.preprocessing) == (size, prompt_size, preprocessing)
    assert model.prompt_encoder.input_image_size == (prompt_size, prompt_size)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m


def test_input_size_override_rules():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("l0", input_size=100)
    with pytest.raises(ValueError, match="only runs at 1024"):
        create_model("vit_b", input_size=512)


def test_backward_reaches_every_encoder_parameter():
    torch.manual_seed(0)
    model = create_model("l0", input_size=96).train()
    emb = model.image_encoder(torch.randn(2, 3, 96, 96))
    low_res, iou = model.decode(
        emb, boxes=torch.tensor([[10.0, 10.0, 600.0, 500.0], [0.0, 0.0, 1000.0, 1000.0]])
    )
    (low_res.mean() + iou.mean()).backward()
    missing = [
        n
        for n, p in model.image_encoder.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing
    assert low_res.shape == (2, 3, 256, 256) and iou.shape == (2, 3)


def test_decoder_shapes_and_mask_input():
    torch.manual_seed(0)
    model = create_model("l0", input_size=64)
    emb = torch.randn(1, 256, 64, 64)
    coords = torch.rand(5, 3, 2) * 1024
    labels = torch.tensor([[1, 0, -1]] * 5)
    with torch.no_grad():
        multi, iou_m = model.decode(emb, point_coords=coords, point_labels=labels, multimask_output=True)
        single, iou_s = model.decode(
            emb, point_coords=coords, point_labels=labels, mask_input=multi[:, :1], multimask_output=False
        )
    assert multi.shape == (5, 3, 256, 256) and iou_m.shape == (5, 3)
    assert single.shape == (5, 1, 256, 256) and iou_s.shape == (5, 1)


def test_decoder_batch_is_prompt_independent():
    """Decoding N prompts at once equals decoding them one by one (broadcast image embedding)."""
    torch.manual_seed(0)
    model = create_model("l0", input_size=64)
    emb = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [500.0, 100.0, 900.0, 1000.0], [0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        batched, iou_b = model.decode(emb, boxes=boxes)
        for i in range(3):
            one, iou_1 = model.decode(emb, boxes=boxes[i : i + 1])
            torch.testing.assert_close(one[0], batched[i], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou_1[0], iou_b[i], rtol=1e-4, atol=1e-5)
