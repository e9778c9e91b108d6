"""Checkpoint formats: official layouts load strictly, anything that does not fit is named."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch.overrides import TorchFunctionMode

from evsam_cli.errors import CheckpointError
from evsam_cli.models import create_model, export_state_dict, hub_dir, read_state_dict, save_weights, zoo


@pytest.fixture(scope="module")
def l0_state():
    torch.manual_seed(1)
    model = create_model("l0")
    # Non-trivial BatchNorm statistics, so a load that skipped buffers would show.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _embed(model, size=64):
    torch.manual_seed(5)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return model.image_encoder(x)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp", "compile"])
def test_official_layouts_load_strictly(tmp_path, l0_state, wrap):
    if wrap == "plain":
        obj = l0_state
    elif wrap == "state_dict":
        obj = {"state_dict": l0_state, "epoch": 3}
    elif wrap == "ddp":
        obj = {"model": {f"module.{k}": v for k, v in l0_state.items()}}
    else:
        obj = {f"_orig_mod.{k}": v for k, v in l0_state.items()}
    path = tmp_path / "efficientvit_sam_l0.pt"
    torch.save(obj, path)
    model = create_model("efficientvit-sam-l0", checkpoint=path, input_size=64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, l0_state[k]), k


def test_official_key_names(l0_state):
    """Spot-check the mit-han-lab layout (these names are the release files' keys)."""
    for key in (
        "image_encoder.backbone.stages.0.op_list.0.conv.weight",
        "image_encoder.backbone.stages.0.op_list.1.main.conv1.conv.weight",
        "image_encoder.backbone.stages.4.op_list.1.context_module.main.qkv.conv.weight",
        "image_encoder.backbone.stages.4.op_list.1.context_module.main.aggreg.0.1.weight",
        "image_encoder.backbone.stages.4.op_list.1.local_module.main.inverted_conv.conv.bias",
        "image_encoder.neck.input_ops.0.op_list.0.conv.weight",
        "image_encoder.neck.middle.op_list.3.main.spatial_conv.norm.running_var",
        "image_encoder.neck.output_ops.0.op_list.0.conv.bias",
        "image_encoder.norm.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.mask_downscaling.6.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
        "mask_decoder.iou_prediction_head.layers.0.weight",
    ):
        assert key in l0_state, key
    assert not any(k.endswith("pixel_mean") or k.endswith("pixel_std") for k in l0_state)


def test_meta_sam_layout_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create_model("sam-vit-b")
    meta = export_state_dict(model)
    assert "image_encoder.blocks.0.mlp.lin1.weight" in meta
    assert "image_encoder.blocks.0.attn.rel_pos_h" in meta
    assert "image_encoder.neck.3.bias" in meta
    assert not any(".mlp.fc1." in k for k in meta)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(meta, path)  # Meta's files are plain state dicts
    loaded = create_model("vit_b", checkpoint=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_save_weights_records_model_and_reloads(tmp_path, l0_state):
    model = create_model("l0", input_size=64)
    model.load_state_dict(l0_state)
    path = save_weights(model, tmp_path / "out" / "model.pt", step=7)
    state, meta = read_state_dict(path)
    assert meta["model"] == "efficientvit-sam-l0" and meta["step"] == 7
    assert not list(path.parent.glob("*.tmp"))
    again = create_model("l0", checkpoint=path, input_size=64)
    torch.testing.assert_close(_embed(again), _embed(model), rtol=0, atol=0)


class _CountInit(TorchFunctionMode):
    """Counts the ``torch.nn.init`` calls that reach their body."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += getattr(func, "__module__", None) == "torch.nn.init"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["l0", "mobile-sam"])
def test_a_loaded_model_skips_random_init(tmp_path, name):
    """With a checkpoint, construction runs no ``torch.nn.init`` function and the model holds
    exactly the file's weights, with its non-persistent buffers (pixel statistics, TinyViT's
    attention-bias indices) as a randomly initialised build has them."""
    torch.manual_seed(0)
    random = create_model(name)
    path = save_weights(random, tmp_path / "w.pt")
    with _CountInit() as counted:
        loaded = create_model(name, checkpoint=path)
    assert counted.calls == 0
    with _CountInit() as counted:
        create_model(name)
    assert counted.calls > 50  # (a build without one draws every weight)
    kept = dict(loaded.named_buffers())
    for key, value in random.named_buffers():
        assert torch.equal(kept[key], value), key
    for key, value in random.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_wrong_model_error_names_model_file_and_keys(tmp_path, l0_state):
    path = tmp_path / "efficientvit_sam_l0.pt"
    torch.save(l0_state, path)
    with pytest.raises(CheckpointError) as info:
        create_model("efficientvit-sam-l1", checkpoint=path)
    msg = str(info.value)
    assert "efficientvit-sam-l1" in msg and str(path) in msg
    assert "missing keys" in msg and "image_encoder.backbone.stages.3.op_list.5" in msg
    assert "looks like efficientvit-sam-l0" in msg


def test_missing_unexpected_and_shape_errors(tmp_path, l0_state):
    state = dict(l0_state)
    state.pop("image_encoder.norm.weight")
    state["image_encoder.extra.weight"] = torch.zeros(3)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        create_model("l0", checkpoint=path)
    msg = str(info.value)
    assert "1 missing keys: image_encoder.norm.weight" in msg
    assert "1 unexpected keys: image_encoder.extra.weight" in msg
    assert "mask_decoder.iou_token.weight (1, 128) vs (1, 256)" in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_model("l0", checkpoint=tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        create_model("l0", checkpoint=garbage)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="not a state dict"):
        create_model("l0", checkpoint=listing)


def test_hub_offline_error_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("EVSAM_HOME", str(tmp_path / "cache"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as info:
        create_model("l0", checkpoint="hub")
    msg = str(info.value)
    assert "efficientvit_sam_l0.pt" in msg and str(tmp_path / "cache" / "efficientvit_sam_l0.pt") in msg
    assert zoo.EFFICIENTVIT_HUB in msg
    assert not list((tmp_path / "cache").glob("*.part"))


def test_hub_uses_cached_file_and_downloads_atomically(tmp_path, monkeypatch, l0_state):
    monkeypatch.setenv("EVSAM_HOME", str(tmp_path))
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        torch.save(l0_state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = create_model("l0", checkpoint="hub", input_size=64)
    assert calls == [zoo.EFFICIENTVIT_HUB + "efficientvit_sam_l0.pt"]
    assert (hub_dir() / "efficientvit_sam_l0.pt").is_file()
    create_model("l0", checkpoint="hub", input_size=64)  # cached: no second download
    assert len(calls) == 1
    assert torch.equal(model.state_dict()["image_encoder.norm.weight"], l0_state["image_encoder.norm.weight"])
