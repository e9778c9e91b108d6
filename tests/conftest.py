"""Shared fixtures: small synthetic images and cached random models.

Tests run on CPU with at most 2 threads so several can share a small machine; GPU and TensorRT
tests carry markers and skip themselves where there is no GPU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = has_gpu
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU"))


@functools.cache
def _random_model(name: str, input_size: int | None, seed: int):
    from evsam_cli.models import create_model

    torch.manual_seed(seed)
    return create_model(name, input_size=input_size)


@pytest.fixture
def small_model():
    """EfficientViT-SAM-L0 with fixed random weights at a 256 input (fast); shared, do not mutate."""
    return _random_model("efficientvit-sam-l0", 256, 0)


def make_scene(height: int = 180, width: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with one bright rectangle; returns (HxWx3 uint8, bool object mask)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((height, width, 3)) * 60 + 40).astype(np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = True
    img[mask] = (200, 180, 60)
    return img, mask


@pytest.fixture
def scene():
    return make_scene()
