"""The paper's published figures, kept as data in this one place.

Source: EfficientViT-SAM (Zhang, Cai, Han; arXiv 2402.05008), Table 1 and the released model
card: COCO / LVIS zero-shot instance-segmentation mAP with ViTDet's boxes as prompts, end-to-end
A100 throughput (TensorRT, fp16, batch 16) and Jetson AGX Orin latency (TensorRT, fp16, batch 1),
data transfer included. SAM-ViT-H's throughput and COCO mAP come from the same paper's
comparison with SAM.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "EfficientViT-SAM paper (arXiv 2402.05008), Table 1"


@dataclass(frozen=True)
class PaperFigures:
    coco_map: float | None  # COCO val2017, ViTDet boxes as prompts
    lvis_map: float | None
    a100_images_per_s: float | None  # TensorRT fp16, batch 16, end to end
    orin_latency_ms: float | None  # Jetson AGX Orin, TensorRT fp16, batch 1, end to end


PAPER: dict[str, PaperFigures] = {
    "efficientvit-sam-l0": PaperFigures(45.7, 41.8, 762.0, 8.2),
    "efficientvit-sam-l1": PaperFigures(46.2, 42.1, 638.0, 10.2),
    "efficientvit-sam-l2": PaperFigures(46.6, 42.7, 538.0, 12.9),
    "efficientvit-sam-xl0": PaperFigures(47.5, 43.9, 278.0, 22.5),
    "efficientvit-sam-xl1": PaperFigures(47.8, 44.4, 182.0, 37.2),
    "sam-vit-h": PaperFigures(46.5, None, 11.0, None),
}


@dataclass(frozen=True)
class GpuSetting:
    name: str
    description: str
    match: tuple[str, ...]  # substrings of the CUDA device name that identify this GPU
    batch_size: int
    dtype: str
    engine: str = "trt"


GPUS: dict[str, GpuSetting] = {
    "a100": GpuSetting("a100", "NVIDIA A100, TensorRT fp16, batch 16", ("a100",), 16, "fp16"),
    "orin": GpuSetting("orin", "NVIDIA Jetson AGX Orin, TensorRT fp16, batch 1", ("orin",), 1, "fp16"),
}


def known_gpus() -> list[str]:
    return list(GPUS)


def paper_figures(model: str) -> PaperFigures | None:
    """The paper's figures for a canonical model name, or None (e.g. SAM ViT-B/L)."""
    return PAPER.get(model)


def reference_for(model: str, gpu: str) -> dict[str, object] | None:
    """``{"source", "gpu", "images_per_s"}`` for ``model`` on ``gpu``, or None without a figure.

    Orin figures are latencies at batch 1; they are given as images/s = 1000 / latency.
    """
    figures = PAPER.get(model)
    setting = GPUS.get(gpu.lower())
    if figures is None or setting is None:
        return None
    if setting.name == "a100":
        value = figures.a100_images_per_s
        note = "A100, TensorRT fp16, batch 16, end to end"
    else:
        value = None if figures.orin_latency_ms is None else round(1000.0 / figures.orin_latency_ms, 1)
        note = f"Jetson AGX Orin, TensorRT fp16, batch 1, {figures.orin_latency_ms} ms end to end"
    if value is None:
        return None
    return {"source": f"{SOURCE} ({note})", "gpu": setting.name, "images_per_s": value}


def device_matches(gpu: str, device_name: str) -> bool:
    """Whether the device found (its name) is the GPU the paper's figures are for."""
    setting = GPUS.get(gpu.lower())
    return setting is not None and any(m in device_name.lower() for m in setting.match)
