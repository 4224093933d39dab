"""The fast path computes the same functions as the model (CPU here; CUDA parts when a GPU is present)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from FastSAM3DLib.acceleration import (FastOptions, FastPath, MaskPaster, _conv_as_linear,
                                       _up_conv_as_linear, bias_from_terms, engine_fast_path,
                                       logits_to_patch_fast,
                                       rel_pos_score_mod, rel_pos_terms)
from FastSAM3DLib.bench import TINY, TINY_WINDOWED, randomize_, upsampled_mask
from FastSAM3DLib.model import Sam3D
from FastSAM3DLib.model.attention import decomposed_rel_pos_bias
from FastSAM3DLib.roi import RoiGeometry, logits_to_patch, positive_box_on_image

CUDA = torch.cuda.is_available()


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module", params=["global", "windowed"])
def tiny(request):
    config = TINY if request.param == "global" else TINY_WINDOWED
    model = randomize_(Sam3D(config), seed=3).eval()
    gen = torch.Generator().manual_seed(4)
    s = config.encoder.img_size
    volume = torch.randn(1, 1, s, s, s, generator=gen)
    with torch.no_grad():
        embedding = model.encode(volume)
    return model, volume, embedding


# -- relative positions --------------------------------------------------------

def _score_mod_bias(score_mod, b, h, q, n):
    index = [torch.arange(x).reshape([-1 if i == j else 1 for j in range(4)]) for i, x in enumerate((b, h, q, n))]
    return score_mod(torch.zeros(b, h, q, n), *index)


def test_rel_pos_terms_give_exactly_the_reference_bias():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5 ** 3, 8, generator=gen)
    tables = [torch.randn(9, 8, generator=gen) for _ in range(3)]
    bias = decomposed_rel_pos_bias(q, (5, 5, 5), *tables)
    terms = rel_pos_terms(q, 5, (5, 5, 5), *tables)
    torch.testing.assert_close(bias_from_terms(*terms, 5, (5, 5, 5)), bias, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(_score_mod_bias(rel_pos_score_mod(*terms, 5, (5, 5, 5)), 2, 3, 125, 125), bias,
                               rtol=1e-6, atol=1e-5)


def test_trimmed_window_bias_is_the_real_query_rows_of_the_padded_bias():
    # a 3^3 grid padded to one 5^3 window: the rows of the 27 real queries
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5 ** 3, 4, generator=gen)
    tables = [torch.randn(9, 4, generator=gen) for _ in range(3)]
    full = decomposed_rel_pos_bias(q, (5, 5, 5), *tables).reshape(1, 2, 5, 5, 5, 125)
    rows = full[:, :, :3, :3, :3].reshape(1, 2, 27, 125)
    terms = rel_pos_terms(q, 5, (3, 3, 3), *tables)
    torch.testing.assert_close(bias_from_terms(*terms, 5, (3, 3, 3)), rows, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(_score_mod_bias(rel_pos_score_mod(*terms, 5, (3, 3, 3)), 1, 2, 27, 125), rows,
                               rtol=1e-6, atol=1e-5)


# -- layout rewrites -------------------------------------------------------------

def test_stride_kernel_convolutions_as_matrix_products():
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv3d(3, 5, kernel_size=2, stride=2)
    up = nn.ConvTranspose3d(5, 4, kernel_size=2, stride=2)
    x = torch.randn(2, 3, 4, 6, 8, generator=gen)
    with torch.no_grad():
        expected = conv(x)
        got = _conv_as_linear(conv, x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        got_up = _up_conv_as_linear(up, expected.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(got_up, up(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_fast_path_with_rewrites_equals_the_model(tiny, attention):
    model, volume, embedding = tiny
    fast = FastPath(model, "cpu", options=FastOptions(rewrites=True, attention=attention))
    assert not fast.graphs_enabled and fast.dtype == torch.float32
    assert _rel(fast.encode(volume), embedding) < 1e-5
    g = model.config.image_embedding_size
    gen = torch.Generator().manual_seed(5)
    s = model.config.encoder.img_size
    for n, multimask, with_mask in [(1, False, True), (3, True, True), (2, False, False)]:
        points = torch.rand(1, n, 3, generator=gen) * (s - 1)
        labels = torch.randint(0, 2, (1, n), generator=gen)
        mask = torch.randn(1, 1, 4 * g, 4 * g, 4 * g, generator=gen) if with_mask else None
        with torch.no_grad():
            ref_logits, ref_iou = model.decode(embedding, points, labels, mask, multimask=multimask)
        logits, iou = fast.decode(embedding, points, labels, mask, multimask=multimask)
        assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
        assert _rel(logits, ref_logits) < 1e-5 and _rel(iou, ref_iou) < 1e-5
        if not multimask:
            low, iou_up, mask_up = fast.decode_upsampled(embedding, points, labels, mask)
            assert _rel(low, ref_logits) < 1e-5
            assert torch.equal(mask_up, upsampled_mask(ref_logits, s))


def test_cpu_fast_path_is_float32_without_graphs(tiny):
    model, volume, embedding = tiny
    fast = FastPath(model, "cpu", torch.bfloat16)           # half precision is CUDA-only: ignored
    assert fast.dtype == torch.float32 and not fast.graphs_enabled and fast.rewrite_decoder
    windowed = model.config.encoder.window_size > model.config.encoder.grid_size
    assert fast.rewrite_encoder == windowed                  # the student encoder: the plain model call
    assert fast.prompt_encoder is model.prompt_encoder       # no copies on the CPU
    if not windowed:
        assert fast.encoder is model.image_encoder
        torch.testing.assert_close(fast.encode(volume), embedding, rtol=0, atol=0)
    assert _rel(fast.encode(volume), embedding) < 1e-5


def test_engine_fast_path_choice(tiny):
    model = tiny[0]
    assert engine_fast_path(model, torch.device("cpu"), torch.float32, "off") is None
    assert engine_fast_path(model, torch.device("cpu"), torch.float32, False) is None
    cpu = engine_fast_path(model, torch.device("cpu"), torch.float32, "auto")
    assert cpu is not None and not cpu.graphs_enabled and cpu.dtype == torch.float32
    assert not engine_fast_path(model, torch.device("cpu"), torch.float32, "compile").options.compile
    with pytest.raises(ValueError):
        engine_fast_path(model, torch.device("cpu"), torch.float32, "sometimes")


# -- paste-back ------------------------------------------------------------------

def _image(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), size=(150, 140, 60), spacing=(0.8, 0.9, 2.0)):
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((12.0, -30.0, 7.0))
    return image


def _sphere_logits(radius_mm=25.0, size=64, spacing=1.5, centre_shift=(3.0, -5.0, 2.0)):
    g = size // 4
    cells = (torch.arange(g, dtype=torch.float32) + 0.5) * 4 - 0.5
    zz, yy, xx = torch.meshgrid(cells, cells, cells, indexing="ij")
    c = (size - 1) / 2
    r = torch.sqrt((zz - c - centre_shift[0]) ** 2 + (yy - c - centre_shift[1]) ** 2
                   + (xx - c - centre_shift[2]) ** 2) * spacing
    return radius_mm - r


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 1, 0, -1, 0, 0, 0, 0, 1),
                                       (0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1)])
@pytest.mark.parametrize("method", ["separable", "grid_sample"])
def test_fast_paste_equals_the_session_paste(direction, method):
    image = _image(direction)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([70.3, 66.1, 28.4]))
    roi = RoiGeometry(tuple(centre), 64, 1.5)
    gen = torch.Generator().manual_seed(7)
    for logits in (_sphere_logits(), torch.randn(16, 16, 16, generator=gen), -torch.ones(16, 16, 16)):
        box = positive_box_on_image(image, roi, logits)
        if box is None:
            assert not (logits > 0).any()
            continue
        expected = logits_to_patch(image, roi, logits, box)
        patch = MaskPaster(method)(image, roi, logits)
        assert patch.start_kji == expected.start_kji and patch.array.shape == expected.array.shape
        differ = int((patch.array != expected.array).sum())
        assert differ <= max(2, expected.array.size // 100000), differ     # values within ~1e-6 of 0


def test_logits_to_patch_fast_is_a_drop_in():
    image = _image()
    roi = RoiGeometry(tuple(np.asarray(image.TransformContinuousIndexToPhysicalPoint([75, 70, 30]))), 64, 1.5)
    logits = _sphere_logits()
    box = positive_box_on_image(image, roi, logits)
    a, b = logits_to_patch(image, roi, logits, box), logits_to_patch_fast(image, roi, logits, box)
    assert a.start_kji == b.start_kji and np.array_equal(a.array, b.array)


# -- CUDA: graphs and half precision ------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_the_model(tiny, dtype):
    model, volume, embedding = tiny
    fast = FastPath(model, "cuda", dtype)
    emb = fast.encode(volume)
    limit = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(emb.float().cpu(), embedding) < limit
    g = model.config.image_embedding_size
    s = model.config.encoder.img_size
    points = torch.tensor([[[s / 2, s / 3, s / 2]]])
    labels = torch.ones(1, 1, dtype=torch.int64)
    mask = torch.randn(1, 1, 4 * g, 4 * g, 4 * g)
    with torch.no_grad():
        ref, _ = model.decode(embedding, points, labels, mask)
    for _ in range(2):                                       # capture, then replay
        logits, _ = fast.decode(emb, points, labels, mask.cuda())
    assert fast.stats.replays >= 3
    assert _rel(logits.cpu(), ref) < limit
    a, b = upsampled_mask(logits.cpu(), s), upsampled_mask(ref, s)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1) >= 0.99


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_triton_paste_equals_the_session_paste():
    image = _image((0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1))
    roi = RoiGeometry(tuple(np.asarray(image.TransformContinuousIndexToPhysicalPoint([70, 66, 28]))), 64, 1.5)
    logits = _sphere_logits().cuda()
    box = positive_box_on_image(image, roi, logits)
    expected = logits_to_patch(image, roi, logits, box)
    patch = MaskPaster("triton")(image, roi, logits)
    assert int((patch.array != expected.array).sum()) <= 2
