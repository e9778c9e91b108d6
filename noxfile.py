"""Developer sessions: ``nox`` runs tests and lint; ``nox -s demo``, ``bench`` and ``gpu`` on demand.

Dependencies come from pyproject.toml (the package and its extras); extra arguments after
``--`` go to the underlying tool, e.g. ``nox -s tests -- -k predictor -x``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU test suite (GPU/TensorRT tests skip themselves)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check, then mypy (configured in pyproject.toml) on the package."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "evsam_cli", "tests", "benchmarks", "noxfile.py", *session.posargs)
    session.run("ruff", "format", "--check", "evsam_cli", "tests", "benchmarks", "noxfile.py")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The whole tool on generated data: zoo, synth data, predict, eval, bench."""
    session.install("-e", ".")
    tmp = session.create_tmp()
    session.run("evsam", "models")
    session.run("evsam", "data", "synth", "--format", "coco", "--images", "4", "-o", f"{tmp}/coco")
    session.run(
        "evsam",
        "predict",
        f"{tmp}/coco/val2017/000000000100.jpg",
        "--box",
        "20,20,200,200",
        "-o",
        f"{tmp}/predict",
    )
    session.run("evsam", "eval", "coco", "--data-root", f"{tmp}/coco", "--prompt", "box", "--model", "l0",
                "--output", f"{tmp}/eval")  # fmt: skip
    session.run("evsam", "bench", "--model", "l0", "--engine", "torch", "--iters", "3", "--warmup", "3")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against the official implementation (needs the dev extra's efficientsam)."""
    session.install("-e", ".[dev]")
    scripts = session.posargs or ["benchmarks/bench_speed.py"]
    for script in scripts:
        session.run("python", script)


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """GPU and TensorRT tests (run on a machine with an NVIDIA GPU)."""
    session.install("-e", ".[dev,trt]")
    session.run("pytest", "-m", "gpu or trt", *session.posargs)
