"""Decoder passes split over two CPU threads: slices, order, thread settings, errors, results."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from evsam_cli.accel.passes import MIN_PROMPTS_PER_THREAD, chunks, map_passes
from evsam_cli.models import create_model
from evsam_cli.predictor.sam_predictor import SamPredictor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_chunks_cover_the_range_in_order():
    assert list(chunks(0, 5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert list(chunks(3, 4, 16)) == [slice(3, 4)]
    assert list(chunks(0, 0, 4)) == []


def _recording():
    calls = []

    def fn(sl: slice) -> tuple[int, int]:
        calls.append((sl, threading.current_thread().name, torch.get_num_threads()))
        return sl.start, sl.stop

    return fn, calls


@pytest.mark.usefixtures("two_threads")
def test_two_halves_run_on_two_threads_with_half_the_threads_each():
    fn, calls = _recording()
    out = map_passes(fn, 40, 16, torch.device("cpu"))
    assert out == [(0, 16), (16, 20), (20, 36), (36, 40)]  # in order, each half in passes of <= 16
    main = threading.current_thread().name
    assert {(c[0].start, c[1] == main) for c in calls} == {(0, True), (16, True), (20, False), (36, False)}
    assert all(c[2] == 1 for c in calls)
    assert torch.get_num_threads() == 2  # restored


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    "n, device, threads",
    [(2 * MIN_PROMPTS_PER_THREAD - 1, "cpu", 2), (40, "cuda", 2), (40, "cpu", 1)],
    ids=["few-prompts", "on-cuda", "one-thread"],
)
def test_no_split_where_it_does_not_pay(n, device, threads):
    torch.set_num_threads(threads)
    fn, calls = _recording()
    out = map_passes(fn, n, 16, torch.device(device))
    assert out == [(sl.start, sl.stop) for sl in chunks(0, n, 16)]
    assert {c[1] for c in calls} == {threading.current_thread().name}
    assert all(c[2] == threads for c in calls)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("failing", [0, 20], ids=["calling-thread", "worker"])
def test_an_error_in_either_half_propagates_and_restores_the_threads(failing):
    def fn(sl: slice) -> None:
        if sl.start == failing:
            raise ValueError(f"bad slice {sl}")

    with pytest.raises(ValueError, match="bad slice"):
        map_passes(fn, 40, 16, torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_predict_batch_on_two_threads_equals_one_pass_at_a_time():
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0", input_size=128)
    predictor = SamPredictor(model, max_prompts_per_pass=6)
    rng = np.random.default_rng(0)
    predictor.set_image(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    xy = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 30, (20, 2))], axis=1)
    split = predictor.predict_batch(boxes=boxes)
    one = [predictor.predict_batch(boxes=boxes[i : i + 6]) for i in range(0, 20, 6)]
    masks, scores, low = (np.concatenate(parts) for parts in zip(*one, strict=True))
    assert split[0].shape == masks.shape == (20, 3, 60, 80)
    np.testing.assert_allclose(split[2], low, rtol=0, atol=1e-5 * np.abs(low).max())
    np.testing.assert_allclose(split[1], scores, rtol=0, atol=1e-5)
    assert (split[0] == masks).mean() > 0.9999


@pytest.mark.usefixtures("two_threads")
def test_evaluation_decodes_both_halves_under_inference_mode(monkeypatch):
    """Grad mode is per thread: the worker's half must not take the autograd path. The image's
    shared decoder state is made before the passes split."""
    model = create_model("efficientvit-sam-l0", input_size=64)
    predictor = SamPredictor(model)
    whole = predictor.backend.decode_tokens
    seen = []

    def decode_tokens(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        shared = predictor.backend._shared  # made before the split, not by each thread
        assert shared is not None and shared.derived and shared.first_conv is not None
        return whole(*args, **kwargs)

    monkeypatch.setattr(predictor.backend, "decode_tokens", decode_tokens)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (20, 2))
    boxes = np.concatenate([xy, xy + 12], axis=1)
    with torch.inference_mode():
        embedding = model.image_encoder(torch.zeros(1, 3, 64, 64))
    predictor.set_embedding(embedding, (60, 80))
    masks = predictor.predict_best(boxes=boxes, max_prompts_per_pass=32)
    assert masks.shape == (20, 60, 80) and masks.dtype == torch.bool
    assert len({name for name, _ in seen}) == 2 and all(mode for _, mode in seen)


@pytest.mark.usefixtures("two_threads")
def test_a_forked_child_gets_its_own_worker():
    """A child forked after the parent used the worker thread must not wait on the parent's."""
    import multiprocessing

    fn, _ = _recording()
    map_passes(fn, 40, 16, torch.device("cpu"))  # the parent's worker exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_split_in_child)
        assert result.get(timeout=60) == [(0, 16), (16, 20), (20, 36), (36, 40)]


def _split_in_child() -> list:
    torch.set_num_threads(2)
    return map_passes(lambda sl: (sl.start, sl.stop), 40, 16, torch.device("cpu"))
