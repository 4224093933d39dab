"""ModelRunner runs the model's own encode/decode: on the CPU eagerly, the capture logic
with the CUDA part replaced by an eager replay; on a GPU (when present) as CUDA graphs.

Imports neither SimpleITK nor scipy at module level, so the CUDA tests run on a bare
torch + pytest install (scripts/bench_gpu.sh)."""

import pytest
import torch

from FastSAM3DLib.acceleration import CapturedCall, ModelRunner
from tiny_models import TINY, TINY_WINDOWED, tiny_model, upsampled_mask

CUDA = torch.cuda.is_available()


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["global", "windowed"])
def tiny(request):
    model = tiny_model(TINY if request.param == "global" else TINY_WINDOWED)
    s = model.config.encoder.img_size
    volume = torch.randn(1, 1, s, s, s, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embedding = model.encode(volume)
    return model, volume, embedding


def _prompts(model, seed=5):
    """(points, labels, mask prompt, multimask) cases of different shapes."""
    gen = torch.Generator().manual_seed(seed)
    s, g = model.config.encoder.img_size, model.config.image_embedding_size
    cases = []
    for n, multimask, with_mask in [(1, False, True), (3, True, True), (2, False, False), (1, False, True)]:
        mask = torch.randn(1, 1, 4 * g, 4 * g, 4 * g, generator=gen) if with_mask else None
        cases.append((torch.rand(1, n, 3, generator=gen) * (s - 1), torch.randint(0, 2, (1, n), generator=gen),
                      mask, multimask))
    return cases


class EagerReplay(CapturedCall):
    """CapturedCall with the CUDA part replaced: "replay" recomputes the captured
    function on the static input buffers and writes into the same output tensors,
    as a graph does."""

    def _capture(self, fn, pool, warmup):
        self.fn = fn
        return fn(*self.inputs)

    def _replay(self):
        for out, new in zip(self.outputs, self.fn(*self.inputs)):
            out.copy_(new)


def test_cpu_runner_is_the_model_call(tiny):
    model, volume, embedding = tiny
    runner = ModelRunner(model, "cpu", graphs=True)          # graphs are CUDA-only: plain calls
    assert not runner.graphs
    torch.testing.assert_close(runner.encode(volume), embedding, rtol=0, atol=0)
    for points, labels, mask, multimask in _prompts(model):
        with torch.no_grad():
            expected = model.decode(embedding, points, labels, mask, multimask=multimask)
        got = runner.decode(embedding, points, labels, mask, multimask=multimask)
        for a, b in zip(got, expected):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not runner._captured


def test_capture_per_shape_with_static_buffers(tiny):
    # Breaking it: not copying new inputs into the buffers, not cloning the outputs, or a
    # key without the number of points / multimask / mask presence makes this fail.
    model, volume, embedding = tiny
    runner = ModelRunner(model, "cpu")
    runner.graphs, runner.capture = True, EagerReplay
    cases = _prompts(model)
    first = None
    for points, labels, mask, multimask in cases + cases:       # captured, then replayed
        with torch.no_grad():
            expected = model.decode(embedding, points, labels, mask, multimask=multimask)
        logits, iou = runner.decode(embedding, points, labels, mask, multimask=multimask)
        assert logits.shape == expected[0].shape
        assert _rel(logits, expected[0]) < 1e-6 and _rel(iou, expected[1]) < 1e-6
        if first is None:
            first = (logits.clone(), logits)
    torch.testing.assert_close(first[1], first[0], rtol=0, atol=0)   # an earlier result is never overwritten
    assert len(runner._captured) == 3                              # 1 point twice: one capture
    other = torch.randn(volume.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model.encode(other)
    runner.encode(volume)
    assert _rel(runner.encode(other), expected) < 1e-6
    runner.release()
    assert not runner._captured


class FailingCapture(CapturedCall):
    """A capture that fails as an uncapturable kernel does."""

    def _capture(self, fn, pool, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_runs_the_same_call_eagerly(tiny):
    model, volume, embedding = tiny
    runner = ModelRunner(model, "cpu")
    runner.graphs, runner.capture = True, FailingCapture
    points, labels, mask, multimask = _prompts(model)[0]
    with torch.no_grad():
        expected = model.decode(embedding, points, labels, mask, multimask=multimask)
    with pytest.warns(UserWarning, match="capture failed"):
        logits, iou = runner.decode(embedding, points, labels, mask, multimask=multimask)
    assert _rel(logits, expected[0]) < 1e-6 and not runner.graphs
    torch.testing.assert_close(runner.encode(volume), embedding, rtol=0, atol=0)


def test_bf16_autocast_path_on_the_cpu(tiny):
    # The code a GPU runs, but the capture: autocast encoder and decoder, replays of
    # static buffers; float32 outputs within the accuracy rule's 2e-2 of the model.
    model, volume, embedding = tiny
    s = model.config.encoder.img_size
    for decoder_precision, limit, min_dice in ((torch.float32, 1e-5, 1.0), (torch.bfloat16, 3e-2, 0.99)):
        runner = ModelRunner(model, "cpu", torch.bfloat16, decoder_precision)
        runner.graphs, runner.capture = True, EagerReplay
        got = runner.encode(volume)
        assert got.dtype == torch.float32 and _rel(got, embedding) < 2e-2
        for points, labels, mask, multimask in _prompts(model):
            with torch.no_grad():
                expected, _ = model.decode(embedding, points, labels, mask, multimask=multimask)
            logits, iou = runner.decode(embedding, points, labels, mask, multimask=multimask)
            assert logits.dtype == iou.dtype == torch.float32 and _rel(logits, expected) < limit
            a, b = upsampled_mask(logits, s), upsampled_mask(expected, s)
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= min_dice


def test_engine_pastes_through_its_paster(tiny):
    sitk = pytest.importorskip("SimpleITK")
    import numpy as np

    from FastSAM3DLib.roi import logits_to_patch
    from FastSAM3DLib.session import Engine
    model = tiny[0]
    calls = []

    def paster(image, roi, logits, box):
        calls.append((roi, tuple(logits.shape)))
        return logits_to_patch(image, roi, torch.ones_like(logits))      # the whole ROI

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(40, 50, 60)).astype(np.float32))
    engine = Engine(model, device="cpu", paster=paster)
    result = engine.new_session(image).add_click((30.0, 25.0, 20.0), space="ijk")
    g = 4 * model.config.image_embedding_size
    assert calls == [(result.roi, (g, g, g))]
    assert result.patch.array.all() and result.patch.array.shape == (40, 50, 60)


# -- CUDA: graphs and half precision ------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_the_model(tiny, precision):
    model, volume, embedding = tiny                         # the CPU model stays the reference
    runner = ModelRunner(tiny_model(model.config), "cuda", precision, tf32=precision != torch.float32)
    limit = 1e-4 if precision == torch.float32 else 2e-2
    assert _rel(runner.encode(volume), embedding) < limit
    s = model.config.encoder.img_size
    for _ in range(2):                                      # captured, then replayed
        for points, labels, mask, multimask in _prompts(model):
            with torch.no_grad():
                expected, _ = model.decode(embedding, points, labels, mask, multimask=multimask)
            logits, _ = runner.decode(embedding.cuda(), points, labels, mask, multimask=multimask)
            assert logits.is_cuda and _rel(logits, expected) < limit
            a, b = upsampled_mask(logits.cpu(), s), upsampled_mask(expected, s)
            assert 2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1) >= 0.99
    assert len(runner._captured) == 4                       # the encoder and three decoder shapes


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_warm_up_captures_the_first_clicks():
    runner = ModelRunner(tiny_model(TINY), "cuda", torch.bfloat16)
    runner.warm_up(max_points=2)
    assert len(runner._captured) == 3
    runner.release()
    assert not runner._captured
