"""Attention paths compute the same function; sparse attention recomposes positions; the
rewritten building blocks (trimmed windows, fused norms, convolutions as matrix products)
compute what their textbook forms do."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from FastSAM3DLib.model import EncoderConfig, ModelConfig, Sam3D
from FastSAM3DLib.model import attention as attention_module
from FastSAM3DLib.model.attention import dilated_segments, relative_position_bias, sparse_attention
from FastSAM3DLib.model.common import LayerNorm3d, up_conv_tokens
from FastSAM3DLib.model.image_encoder import EncoderBlock, PatchEmbed3D, window_partition, window_unpartition


def _explicit_attention(q, k, v, bias):
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias
    return torch.softmax(logits.float(), dim=-1) @ v


def _qkv(seed=0, b=2, heads=3, n=64, d=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=gen) for _ in range(3)]


def test_sdpa_with_rel_pos_bias_equals_explicit_softmax():
    q, k, v = _qkv(n=4 * 4 * 4)
    gen = torch.Generator().manual_seed(5)
    tables = [torch.randn(7, 16, generator=gen) * 0.1 for _ in range(3)]
    bias = relative_position_bias(q, 4, *tables)
    torch.testing.assert_close(attention_module.attention(q, k, v, bias),
                               _explicit_attention(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_decomposed_rel_pos_matches_the_trained_definition():
    # bias(query (a,b,c), key (a',b',c')) = <q(a,b,c), Rd[a-c']> + <q(a,b,a'), Rh[b-c']>
    #                                     + <q(a,b,b'), Rw[b'-c']>   (see relative_position_bias)
    q, _, _ = _qkv(b=1, heads=1, n=27, d=4)
    gen = torch.Generator().manual_seed(3)
    rd, rh, rw = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    bias = relative_position_bias(q, 3, rd, rh, rw)[0, 0]
    qg = q[0, 0].reshape(3, 3, 3, 4)
    positions = [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]
    for qi, (a, b, c) in enumerate(positions):
        for ki, (a2, b2, c2) in enumerate(positions):
            expected = qg[a, b, c] @ rd[a - c2 + 2] + qg[a, b, a2] @ rh[b - c2 + 2] + qg[a, b, b2] @ rw[b2 - c2 + 2]
            torch.testing.assert_close(bias[qi, ki], expected)


def test_rel_pos_bias_of_a_query_sub_grid_is_those_rows_of_the_full_bias():
    # a 3^3 grid padded to one 5^3 window: only the rows of the 27 real queries
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5 ** 3, 4, generator=gen)
    tables = [torch.randn(9, 4, generator=gen) for _ in range(3)]
    full = relative_position_bias(q, 5, *tables).reshape(1, 2, 5, 5, 5, 125)
    rows = relative_position_bias(q, 5, *tables, query_shape=(3, 2, 3))
    torch.testing.assert_close(rows, full[:, :, :3, :2, :3].reshape(1, 2, 18, 125))


def test_sparse_attention_with_one_dense_segment_is_exact():
    q, k, v = _qkv()
    bias = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sparse_attention(q, k, v, bias, ((64, 1),)),
                               _explicit_attention(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_sparse_segment_is_attention_among_its_tokens_only():
    q, k, v = _qkv(heads=2, n=32)
    out = sparse_attention(q, k, v, None, ((16, 2),))
    for head in range(2):
        idx = dilated_segments(32, 16, 2, head)
        assert idx.shape == (2, 8) and idx[0, 0] == head % 2
        for seg in idx:
            expected = _explicit_attention(q[:, head, seg], k[:, head, seg], v[:, head, seg], 0.0)
            torch.testing.assert_close(out[:, head, seg], expected, rtol=1e-5, atol=1e-5)
        uncovered = torch.ones(32, dtype=torch.bool)
        uncovered[idx.reshape(-1)] = False
        assert torch.all(out[:, head, uncovered] == 0)


def test_sparse_attention_recomposes_tokens_to_original_positions():
    # Permuting the tokens inside every segment the same way permutes the output
    # the same way: outputs land back at the positions their tokens came from.
    q, k, v = _qkv(heads=1, n=32)
    pairs = ((8, 1),)
    perm = torch.cat([torch.randperm(8, generator=torch.Generator().manual_seed(s)) + 8 * s for s in range(4)])
    out = sparse_attention(q, k, v, None, pairs)
    out_perm = sparse_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], None, pairs)
    torch.testing.assert_close(out_perm, out[:, :, perm], rtol=1e-5, atol=1e-6)


def test_several_branches_combine_to_softmax_over_union_of_keys():
    q, k, v = _qkv(heads=1, n=16)
    # (16, 2) covers even tokens with even keys; (16, 1) adds all keys: union = all keys,
    # but even tokens see even keys twice -> weights add up as two branches.
    out = sparse_attention(q, k, v, None, ((16, 1), (16, 1)))
    torch.testing.assert_close(out, _explicit_attention(q, k, v, 0.0), rtol=1e-5, atol=1e-5)


def test_encoder_with_sparse_attention_keeps_shapes():
    config = ModelConfig(name="t", encoder=EncoderConfig(embed_dim=64, depth=2, num_heads=2, window_size=0,
                                                         global_attn_indexes=(), block_formula="fastsam3d"))
    model = Sam3D(config).eval()
    volume = torch.randn(1, 1, 128, 128, 128)
    with torch.no_grad():
        exact = model.encode(volume)
        model.image_encoder.set_sparse_attention(((64, 2), (512, 8)))
        sparse = model.encode(volume)
        model.image_encoder.set_sparse_attention(((512, 1),))
        full_segment = model.encode(volume)
    assert sparse.shape == exact.shape == (1, 384, 8, 8, 8)
    assert not torch.allclose(sparse, exact)
    torch.testing.assert_close(full_segment, exact, rtol=1e-4, atol=1e-4)


def test_flash_attn_is_used_when_installed_and_applicable(monkeypatch):
    calls = []

    def fake_flash(q, k, v):           # flash-attn layout: (B, N, heads, d)
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash))
    q, k, v = _qkv()

    class FakeCuda(torch.Tensor):
        is_cuda = True

    qh = q.half().as_subclass(FakeCuda)
    out = attention_module.attention(qh, k.half(), v.half())
    assert calls == [(2, 64, 3, 16)]
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)
    # With a bias (rel-pos), flash-attn does not apply: SDPA is used.
    attention_module.attention(qh, k.half(), v.half(), torch.zeros(2, 3, 64, 64))
    assert len(calls) == 1


@pytest.mark.parametrize("window", [0, 6])
def test_windowed_block_pads_to_the_window(window):
    config = EncoderConfig(embed_dim=32, depth=1, num_heads=2, window_size=window,
                           global_attn_indexes=(), img_size=64)
    block = EncoderBlock(config, 0)
    assert block.attn.rel_pos_d.shape[0] == 2 * (window or 4) - 1
    out = block(torch.randn(1, 4, 4, 4, 32))
    assert out.shape == (1, 4, 4, 4, 32)


@pytest.mark.parametrize("grid", [(4, 4, 4), (6, 6, 6), (3, 5, 2)])
def test_trimmed_window_equals_attention_over_the_zero_padded_window(grid):
    # Breaking it (padding qkv with zeros instead of the qkv bias, or the bias rows of
    # other queries) makes this fail.
    torch.manual_seed(0)
    attn = attention_module.Attention3D(32, 2, use_rel_pos=True, rel_pos_grid=6)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, *grid, 32)
        windows, padded = window_partition(x, 6)
        expected = window_unpartition(attn(windows), 6, padded, grid)
        torch.testing.assert_close(attn(x, window=6), expected, rtol=1e-5, atol=1e-5)


def test_building_blocks_equal_their_textbook_forms():
    gen = torch.Generator().manual_seed(2)
    norm = LayerNorm3d(5)
    up = nn.ConvTranspose3d(5, 4, kernel_size=2, stride=2)
    embed = PatchEmbed3D(4, 2, 6)
    with torch.no_grad():
        for module in (norm, up, embed):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(2, 5, 3, 4, 6, generator=gen)
        mean = x.mean(1, keepdim=True)
        textbook = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + norm.eps)
        textbook = norm.weight[:, None, None, None] * textbook + norm.bias[:, None, None, None]
        torch.testing.assert_close(norm(x), textbook, rtol=1e-5, atol=1e-5)
        tokens = x.permute(0, 2, 3, 4, 1)
        torch.testing.assert_close(norm.tokens(tokens), textbook.permute(0, 2, 3, 4, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up_conv_tokens(up, tokens), up(x).permute(0, 2, 3, 4, 1),
                                   rtol=1e-5, atol=1e-5)
        volume = torch.randn(1, 2, 8, 12, 16, generator=gen)
        torch.testing.assert_close(embed(volume), embed.proj(volume).permute(0, 2, 3, 4, 1), rtol=1e-4, atol=1e-4)
