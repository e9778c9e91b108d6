"""ONNX export of the image encoder and of a prompt-encoder + mask-decoder graph.

The wrappers here are traceable views of a ``Sam`` model; the model code itself stays plain.
The decoder graph takes prompts as labelled points (SAM's ONNX convention):

* ``image_embeddings`` (1, 256, 64, 64): one image, broadcast over the N prompts inside the
  graph (never tiled per prompt: TensorRT fails on Tile/repeat_interleave of the embedding).
* ``point_coords`` (N, K, 2) float32 x,y in the 1024 prompt frame; ``point_labels`` (N, K)
  float32: 1 foreground, 0 background, -1 padding, 2/3 the top-left/bottom-right box corners.
  Without a box, append one padding point (0, 0) with label -1, as SAM's prompt encoder does.
* ``mask_input`` (M, 1, 256, 256) low-res logits and ``has_mask_input`` (M,), M = 1 (shared by
  all prompts; zeros with ``has_mask_input = 0`` when there is no mask) or N.

Outputs ``low_res_masks`` (N, 4, 256, 256) and ``iou_predictions`` (N, 4): index 0 is SAM's
single-mask output, 1-3 the multimask outputs, so one graph serves both modes.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..accel.encoder import use_matmul_resize_
from ..models.layers import LayerNorm2d, LiteMLA, Upsample
from ..models.sam import PIXEL_MEAN, PIXEL_STD, Sam
from ..utils.io import atomic_path
from .errors import ExportError

DEFAULT_OPSET = 17  # TensorRT 10's parser covers it; LayerNormalization exists from 17 on
# For onnxruntime: opset 20 has GELU as one op (``Gelu``), which onnxruntime runs as one kernel
# instead of the 7-op tanh formula (12% of the L0 encoder's time on a CPU).
ONNXRUNTIME_OPSET = 20
ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
# Node-name prefix of the parts that must stay float32 under TensorRT fp16 (see tensorrt.py).
FP32_TAG = "evsam_fp32/"
# Above this many bytes of weights a graph is saved with its weights in a side file (protobuf's
# hard limit is 2 GB; SAM ViT-H's encoder is 2.5 GB in float32).
EXTERNAL_DATA_BYTES = 1_800_000_000


class EncoderOnnxWrapper(nn.Module):
    """(B, 3, S, S) normalised, padded images -> (B, 256, 64, 64) embeddings.

    The neck's bicubic resizes are exported as two MatMuls each (``MatmulResize``, the same
    weights), on a copy of the encoder: onnxruntime's cubic ``Resize`` kernel took a quarter of
    the exported L0 encoder's time on a CPU.
    """

    def __init__(self, model: Sam) -> None:
        super().__init__()
        encoder = model.image_encoder
        if any(isinstance(m, Upsample) for m in encoder.modules()):
            encoder = copy.deepcopy(encoder)
            use_matmul_resize_(encoder)
        self.image_encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.image_encoder(images)


class DecoderOnnxWrapper(nn.Module):
    """Labelled points (+ optional low-res mask) -> all four masks and IoU predictions."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        # The positional encoding of the 64x64 grid is a constant: bake it instead of tracing sin/cos.
        self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().detach().clone())

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
    ) -> tuple[Tensor, Tensor]:
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * self.prompt_encoder.embed_masks(mask_input) + (1 - has_mask) * no_mask
        return self.mask_decoder.predict_masks(image_embeddings, self.image_pe, sparse, dense)  # type: ignore[arg-type]  # a buffer


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote."""

    encoder_path: Path
    decoder_path: Path
    opset: int
    exporter: str
    mask_batch: str  # "broadcast": mask_input batch is 1 or N; "prompts": it must be N
    fp32_nodes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # names written, weight side files included


def torchscript_exporter_available() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter) still exists."""
    try:
        from torch.onnx._internal import torchscript_exporter  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_exporter(exporter: str) -> str:
    if exporter == "auto":
        return "torchscript" if torchscript_exporter_available() else "dynamo"
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r}: use auto, torchscript or dynamo")
    if exporter == "torchscript" and not torchscript_exporter_available():
        raise ExportError(
            f"torch {torch.__version__} has no TorchScript ONNX exporter; use --exporter dynamo"
        )
    return exporter


def example_decoder_inputs(
    num_prompts: int = 3, num_points: int = 2, mask_rows: int = 1
) -> tuple[Tensor, ...]:
    """Inputs for tracing; N > 1 and K > 1 so that no prompt axis is specialised to 1.

    ``mask_rows`` 1 traces the shared-mask broadcast (the image side stays batch 1 until the
    prompts meet it); the dynamo exporter needs ``num_prompts`` rows instead.
    """
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(num_prompts, num_points, 2, generator=gen) * 1024
    labels = torch.randint(0, 4, (num_prompts, num_points), generator=gen).float()
    return (
        torch.randn(1, 256, 64, 64, generator=gen),
        coords,
        labels,
        torch.zeros(mask_rows, 1, 256, 256),
        torch.zeros(mask_rows),
    )


def _export_one(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    *,
    exporter: str,
    opset: int,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
) -> Any:
    """Export ``module`` and return the loaded ``onnx.ModelProto`` (weights included).

    The exporter writes into a private temporary folder beside ``path`` (it may split large
    weights into side files there); nothing reaches the output folder until ``_finalise``.
    """
    import onnx

    with (
        warnings.catch_warnings(),
        torch.no_grad(),
        tempfile.TemporaryDirectory(prefix=".evsam-export-", dir=path.parent) as tmp_dir,
    ):
        raw = str(Path(tmp_dir) / "raw.onnx")
        # Tracer warnings about Python ints are expected: every axis we make dynamic is checked by
        # running the exported graph at other sizes (export/parity.py).
        warnings.simplefilter("ignore")
        graph: dict[str, Any] = dict(
            opset_version=opset, input_names=list(input_names), output_names=list(output_names)
        )
        if exporter == "torchscript":
            torch.onnx.export(
                module, args, raw, dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=True, **graph
            )
        else:
            dims: dict[str, torch.export.Dim] = {}

            def dim(name: str) -> torch.export.Dim:
                return dims.setdefault(name, torch.export.Dim(name, min=1, max=65536))

            dynamic_shapes = tuple(
                {axis: dim(label) for axis, label in dynamic_axes[n].items()} if n in dynamic_axes else None
                for n in input_names
            )
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **graph
            )
            assert program is not None
            program.save(raw)
        return onnx.load(raw, load_external_data=True)


def _owner_module(node: Any, exporter: str) -> str:
    """Qualified name of the nn.Module whose forward emitted an ONNX node ("" if unknown)."""
    if exporter == "dynamo":
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                scopes = ast.literal_eval(prop.value)
                return scopes[-2] if len(scopes) >= 2 else ""
        return ""
    # TorchScript names nodes after their scope: "/backbone/stages.0/op_list.1/conv/Conv"; a called
    # nn.Sequential opens its own scope before its children's ("/output_upscaling/output_upscaling.1").
    parts = node.name.strip("/").split("/")[:-1]
    opened: list[str] = []
    for part in parts:
        if opened and "." in part and part.rsplit(".", 1)[0] == opened[-1]:
            opened[-1] = part
        else:
            opened.append(part)
    return ".".join(opened)


def tag_fp32_nodes(model_proto: Any, root: nn.Module, exporter: str) -> int:
    """Prefix with ``FP32_TAG`` the nodes that normalise: LayerNorms and LiteMLA's attention.

    The model computes these in float32 whatever the input dtype (fp16 overflows in the variance
    and in the linear-attention sums); the tag lets the TensorRT builder keep them in float32 when
    it builds fp16 engines. Returns the number of tagged nodes.
    """
    norms = [n for n, m in root.named_modules() if isinstance(m, (LayerNorm2d, nn.LayerNorm))]
    attentions = [n for n, m in root.named_modules() if isinstance(m, LiteMLA)]
    attentions += [f"{n}.kernel_func" for n in attentions]

    def same(owner: str, name: str) -> bool:
        # A method called directly (mask_decoder.predict_masks) opens no scope for its module, so
        # the recorded owner may lack leading components of the qualified name.
        return bool(owner) and (name == owner or name.endswith("." + owner))

    count = 0
    for node in model_proto.graph.node:
        owner = _owner_module(node, exporter)
        # A module called twice scopes its second call as "name_1" (LiteMLA's kernel_func).
        owners = {owner, re.sub(r"_\d+(?=\.|$)", "", owner)}
        parents = {o.rsplit(".", i)[0] for o in owners for i in range(o.count(".") + 1)}
        in_norm = any(same(p, n) for p in parents for n in norms)
        if in_norm or any(same(o, n) for o in owners for n in attentions):
            node.name = FP32_TAG + (node.name or f"{node.op_type}_{count}")
            count += 1
    return count


def _set_metadata(model_proto: Any, meta: dict[str, Any]) -> None:
    del model_proto.metadata_props[:]
    for key, value in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key = f"evsam.{key}"
        entry.value = json.dumps(value)


def _weight_bytes(proto: Any) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _finalise(
    proto: Any, path: Path, root: nn.Module, exporter: str, meta: dict[str, Any]
) -> tuple[int, list[str]]:
    """Tag fp32 nodes, attach metadata, check the graph and write it; (tagged nodes, files written).

    Graphs whose weights exceed ``EXTERNAL_DATA_BYTES`` (protobuf stops at 2 GB: SAM ViT-H) are
    written as ``NAME.onnx`` plus one ``NAME.onnx.data``; both are completed in a temporary folder
    and renamed into place, the weights first.
    """
    import onnx

    tagged = tag_fp32_nodes(proto, root, exporter)
    _set_metadata(proto, meta)
    if _weight_bytes(proto) <= EXTERNAL_DATA_BYTES:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported graph {path} fails the ONNX checker: {exc}") from None
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
        return tagged, [path.name]
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".evsam-export-", dir=path.parent) as tmp_dir:
        staged = Path(tmp_dir) / path.name
        onnx.save_model(
            proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
        )
        try:
            onnx.checker.check_model(str(staged), full_check=True)  # by path: no 2 GB limit
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported graph {path} fails the ONNX checker: {exc}") from None
        os.replace(Path(tmp_dir) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return tagged, [path.name, data_name]


def export_onnx(
    model: Sam,
    output_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> OnnxExport:
    """Write ``encoder.onnx`` and ``decoder.onnx`` (float32) for ``model`` into ``output_dir``.

    Dynamic axes: the encoder batch; the decoder's prompt count N, points per prompt K and the
    mask-input batch. Parity with PyTorch is measured separately (``export.parity``).
    """
    exporter = resolve_exporter(exporter)
    if exporter == "dynamo" and opset < 18:
        opset = 18  # the dynamo exporter's lowest opset (it cannot convert Pad down to 17)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    device = model.device
    size = model.input_size
    base_meta = {
        "model": model.name,
        "input_size": size,
        "prompt_size": model.prompt_size,
        "preprocessing": model.preprocessing,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "opset": opset,
        "exporter": exporter,
    }

    encoder = EncoderOnnxWrapper(model).eval()
    enc_path = out / "encoder.onnx"
    enc_proto = _export_one(
        encoder,
        (torch.randn(2, 3, size, size, device=device),),
        enc_path,
        exporter=exporter,
        opset=opset,
        input_names=ENCODER_INPUTS,
        output_names=ENCODER_OUTPUTS,
        dynamic_axes={"images": {0: "batch"}, "image_embeddings": {0: "batch"}},
    )
    tagged_enc, enc_files = _finalise(
        enc_proto, enc_path, encoder, exporter, {**base_meta, "graph": "encoder"}
    )
    del enc_proto

    # The dynamo exporter cannot keep "1 or N" broadcasting symbolic: there the mask batch is N.
    mask_batch = "broadcast" if exporter == "torchscript" else "prompts"
    decoder = DecoderOnnxWrapper(model).eval()
    dec_path = out / "decoder.onnx"
    prompt_axes = {0: "num_prompts", 1: "num_points"}
    mask_axis = {0: "mask_batch" if mask_batch == "broadcast" else "num_prompts"}
    dec_proto = _export_one(
        decoder,
        tuple(t.to(device) for t in example_decoder_inputs(mask_rows=1 if mask_batch == "broadcast" else 3)),
        dec_path,
        exporter=exporter,
        opset=opset,
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_axes={
            "point_coords": prompt_axes,
            "point_labels": prompt_axes,
            "mask_input": mask_axis,
            "has_mask_input": mask_axis,
            "low_res_masks": {0: "num_prompts"},
            "iou_predictions": {0: "num_prompts"},
        },
    )
    tagged_dec, dec_files = _finalise(
        dec_proto, dec_path, decoder, exporter, {**base_meta, "graph": "decoder", "mask_batch": mask_batch}
    )
    mask_dim = "M" if mask_batch == "broadcast" else "N"
    return OnnxExport(
        encoder_path=enc_path,
        decoder_path=dec_path,
        opset=opset,
        exporter=exporter,
        mask_batch=mask_batch,
        fp32_nodes={"encoder": tagged_enc, "decoder": tagged_dec},
        files=enc_files + dec_files,
        shapes={
            "encoder": {
                "inputs": {"images": ["B", 3, size, size]},
                "outputs": {"image_embeddings": ["B", 256, 64, 64]},
            },
            "decoder": {
                "inputs": {
                    "image_embeddings": [1, 256, 64, 64],
                    "point_coords": ["N", "K", 2],
                    "point_labels": ["N", "K"],
                    "mask_input": [mask_dim, 1, 256, 256],
                    "has_mask_input": [mask_dim],
                },
                "outputs": {"low_res_masks": ["N", 4, 256, 256], "iou_predictions": ["N", 4]},
            },
        },
    )
