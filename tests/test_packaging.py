"""pyproject.toml promises: `evsam[all]` installs from PyPI alone (no TensorRT stub)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _expand(extras: dict[str, list[str]], name: str) -> set[str]:
    """Every requirement ``evsam[name]`` pulls, with self-references followed."""
    found: set[str] = set()
    for req in extras[name]:
        inner = re.fullmatch(r"evsam\[([^\]]+)\]", req)
        if inner:
            for sub in inner.group(1).split(","):
                found |= _expand(extras, sub.strip())
        else:
            found.add(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower())
    return found


def test_all_extra_needs_no_tensorrt():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    everything = _expand(extras, "all")
    assert "tensorrt" not in everything
    assert _expand(extras, "trt") == {"tensorrt"}
    for extra in ("yolo", "gdino", "lvis", "dev"):
        assert _expand(extras, extra) <= everything
