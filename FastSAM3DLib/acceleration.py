"""The fast inference path: the same functions as ``Sam3D.encode`` / ``Sam3D.decode``,
with fewer and cheaper GPU launches.

``FastPath(model, device, dtype)`` (or ``accelerate(...)``) gives

* ``encode(volume)``: (1, 1, S, S, S) crop -> image embedding (1, C, g, g, g);
* ``decode(embedding, points, labels, mask_logits=None, multimask=False)``:
  -> low-res logits (B, 1|3, s, s, s) float32 and IoU estimates (B, 1|3) float32.

What it does on CUDA (each lever can be switched off, see ``FastOptions``):

* half-precision weights (bf16 by default) for the image encoder; the prompt
  encoder and mask decoder stay in float32 by default (they are latency-bound,
  so fp32 costs nothing and keeps the decoder exact);
* the fixed-shape encoder and decoder run as replays of captured CUDA graphs
  over static buffers (the encoder at batch 1, the decoder per number of points);
* layout rewrites that compute the same sums with fewer, larger kernels:
  stride = kernel convolutions (patch embedding, mask downscaling, the
  transposed convolutions of the upscaling) as matrix products on channels-last
  tokens, LayerNorm3d as ``layer_norm`` over the channel axis, the prompt
  encoder's dense positional encoding computed once, only the selected mask's
  hypernetwork evaluated;
* windowed attention of a grid smaller than its window (SAM-Med3D: 8^3 tokens
  padded to one 14^3 window) only for the real queries: the padded tokens are
  zeros after the norm, so their keys and values are the ``qkv`` bias, and their
  outputs are cropped anyway (5.4 x less attention work, same function);
* the relative-position bias from its three per-axis terms (exactly
  ``decomposed_rel_pos_bias``, including the reference's broadcasting layout),
  either materialised for SDPA or applied inside FlexAttention's score_mod;
* optional ``torch.compile`` (then graph capture of the compiled code).

On the CPU it is the plain float32 model: no graphs, no rewrites (measured
there, they do not pay).

``MaskPaster`` / ``logits_to_patch_fast`` give ``roi.logits_to_patch``'s mask
(the low-res logits evaluated directly at the image's voxel centres, no 128^3
upsample) over only the sub-box the mask can occupy, computed on the GPU and
handed back through a pinned buffer.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model.attention import attention, relative_position_table
from .model.common import LayerNorm3d

__all__ = ["FastOptions", "FastPath", "accelerate", "rel_pos_terms", "bias_from_terms",
           "rel_pos_score_mod", "MaskPaster",
           "logits_to_patch_fast"]


@dataclass(frozen=True)
class FastOptions:
    graphs: bool = True                  # capture CUDA graphs (CUDA only)
    compile: str | None = None           # None or a torch.compile mode ("default", "max-autotune-no-cudagraphs")
    attention: str = "sdpa"              # "sdpa" (bias materialised) or "flex" (bias in score_mod; needs compile)
    # conv-as-matmul, channels-last norms, trimmed windows, fp32 residual stream. None: everywhere
    # on CUDA; on the CPU the decoder and trimmable windowed encoders (measured: faster there too;
    # the student encoder on the CPU stays the plain model call).
    rewrites: bool | None = None
    decoder_dtype: torch.dtype | None = torch.float32   # None: the encoder's dtype
    decoder_tf32: bool | None = None     # fp32 decoder matmuls on TF32 tensor cores (None: if the encoder is half)
    warmup: int = 2                      # eager runs before a capture
    precapture_points: int = 0           # decoder graphs for 1..n points captured with the encoder's

    def for_device(self, device: torch.device) -> "FastOptions":
        if device.type == "cuda":
            return self
        return replace(self, graphs=False, compile=None, decoder_tf32=False)


# ---------------------------------------------------------------------------
# Relative positions: the bias of decomposed_rel_pos_bias from its three terms
# ---------------------------------------------------------------------------

def rel_pos_terms(q: torch.Tensor, grid: int, query_shape: tuple[int, int, int],
                  rel_d: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, tables=None):
    """Per-axis terms of the decomposed relative-position bias.

    q (B, heads, grid^3, d): the unscaled queries of a cubic grid (padding
    included); the bias is wanted for the queries of the sub-grid
    ``[:qd, :qh, :qw]`` only. Returns

    * t_d (B, heads, qd*qh*qw, G): [query (a,b,c), c']
    * t_h (B, heads, qd*qh, G, G): [(a,b), a', c']
    * t_w (B, heads, qd*qh, G, G): [(a,b), b', c']

    so that bias(query (a,b,c), key (a',b',c')) = t_d + t_h + t_w, which is what
    ``decomposed_rel_pos_bias`` adds (the reference's broadcasting layout: query
    voxels (a,b,a') and (a,b,b') enter the second and third terms). ``tables``:
    the three ``relative_position_table`` gathers, if precomputed.
    """
    b, heads, n, d = q.shape
    g = grid
    qd, qh, qw = query_shape
    r_q = q.reshape(b, heads, g, g, g, d)
    if tables is None:
        tables = [relative_position_table(g, t) for t in (rel_d, rel_h, rel_w)]
    table_d, table_h, table_w = tables
    t_d = torch.einsum("bnxyzc,xkc->bnxyzk", r_q[:, :, :qd, :qh, :qw], table_d[:qd])
    t_h = torch.einsum("bnxyzc,ykc->bnxyzk", r_q[:, :, :qd, :qh], table_h[:qh])
    t_w = torch.einsum("bnxyzc,zkc->bnxyzk", r_q[:, :, :qd, :qh], table_w)
    return (t_d.reshape(b, heads, qd * qh * qw, g), t_h.reshape(b, heads, qd * qh, g, g),
            t_w.reshape(b, heads, qd * qh, g, g))


def bias_from_terms(t_d, t_h, t_w, grid: int, query_shape: tuple[int, int, int]) -> torch.Tensor:
    """The materialised bias (B, heads, qd*qh*qw, grid^3) of ``rel_pos_terms``."""
    g = grid
    qd, qh, qw = query_shape
    b, heads = t_d.shape[:2]
    bias = (t_d.reshape(b, heads, qd, qh, qw, 1, 1, g)
            + t_h.reshape(b, heads, qd, qh, 1, g, 1, g)
            + t_w.reshape(b, heads, qd, qh, 1, 1, g, g))
    return bias.reshape(b, heads, qd * qh * qw, g ** 3)


def rel_pos_score_mod(t_d, t_h, t_w, grid: int, query_shape: tuple[int, int, int]):
    """FlexAttention score_mod adding the same bias without materialising it."""
    g = grid
    qw = query_shape[2]

    def score_mod(score, b, h, q_idx, kv_idx):
        ab = q_idx // qw
        ka = kv_idx // (g * g)
        kb = (kv_idx // g) % g
        kc = kv_idx % g
        return score + t_d[b, h, q_idx, kc] + t_h[b, h, ab, ka, kc] + t_w[b, h, ab, kb, kc]

    return score_mod


_FLEX: dict = {}


def _flex_attention(device_type: str):
    """flex_attention, compiled on CUDA (uncompiled it materialises the scores)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX[device_type] = torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention
    return _FLEX[device_type]


# ---------------------------------------------------------------------------
# Encoder forward with the rewrites (same function as ImageEncoderViT3D.forward)
# ---------------------------------------------------------------------------

def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D/p, H/p, W/p, C*p^3), each patch flattened as (c, pd, ph, pw)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // p, h // p, w // p, c * p ** 3)


def _patchify_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """Channels-last (B, D, H, W, C) -> (B, D/p, H/p, W/p, C*p^3) flattened as (c, pd, ph, pw)."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // p, p, h // p, p, w // p, p, c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, d // p, h // p, w // p, c * p ** 3)


def _is_patch_conv(conv: nn.Module) -> bool:
    if not isinstance(conv, nn.Conv3d) or conv.groups != 1:
        return False
    k, s, pad, dil = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (len(set(k)) == 1 and tuple(k) == tuple(s) and tuple(pad) == (0, 0, 0)
            and tuple(dil) == (1, 1, 1) and conv.padding_mode == "zeros")


def _conv_as_linear(conv: nn.Conv3d, tokens: torch.Tensor) -> torch.Tensor:
    """A stride = kernel Conv3d on channels-last tokens (B, D, H, W, Cin) -> (B, D/k, H/k, W/k, Cout)."""
    k = conv.kernel_size[0]
    x = tokens if k == 1 else _patchify_tokens(tokens, k)
    return F.linear(x, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _is_up_conv(conv: nn.Module) -> bool:
    if not isinstance(conv, nn.ConvTranspose3d) or conv.groups != 1:
        return False
    k, s = conv.kernel_size, conv.stride
    return (len(set(k)) == 1 and tuple(k) == tuple(s) and tuple(conv.padding) == (0, 0, 0)
            and tuple(conv.output_padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1))


def _up_conv_as_linear(conv: nn.ConvTranspose3d, tokens: torch.Tensor) -> torch.Tensor:
    """A stride = kernel ConvTranspose3d on channels-last tokens (B, D, H, W, Cin)
    -> (B, kD, kH, kW, Cout): one matrix product and one pixel shuffle."""
    k = conv.kernel_size[0]
    b, d, h, w, _ = tokens.shape
    cout = conv.out_channels
    weight = conv.weight.reshape(conv.in_channels, cout * k ** 3)     # (Cin, Cout*k^3), (o, i, j, l) order
    bias = None if conv.bias is None else conv.bias.repeat_interleave(k ** 3)
    y = F.linear(tokens, weight.t(), bias).reshape(b, d, h, w, cout, k, k, k)
    return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, d * k, h * k, w * k, cout)


def _channel_norm(norm: LayerNorm3d, tokens: torch.Tensor) -> torch.Tensor:
    """LayerNorm3d of a (B, C, D, H, W) tensor, applied to its channels-last tokens."""
    return F.layer_norm(tokens, (tokens.shape[-1],), norm.weight, norm.bias, norm.eps)


def _attention(attn, y: torch.Tensor, window: int, flex: bool, tables: dict | None = None):
    """Attention3D (+ windowing) on normalised tokens y (B, D, H, W, C), for a grid
    that fits one window (or global attention on a cubic grid). None: not applicable."""
    if attn.sparse_pairs:
        return None
    b, d, h, w, c = y.shape
    heads, hd = attn.num_heads, attn.head_dim
    if window:
        if max(d, h, w) > window:
            return None
        g = window
    else:
        if not d == h == w:
            return None
        g = d
    qkv = attn.qkv(y)
    if (d, h, w) != (g, g, g):
        # Zero-padded tokens (window_partition pads after the norm): qkv(0) = the bias.
        full = attn.qkv.bias.to(qkv.dtype).expand(b, g, g, g, 3 * c).clone()
        full[:, :d, :h, :w] = qkv
        qkv = full
    q, k, v = qkv.reshape(b, g ** 3, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q_real = q
    if (d, h, w) != (g, g, g):
        q_real = q.reshape(b, heads, g, g, g, hd)[:, :, :d, :h, :w].reshape(b, heads, d * h * w, hd)
    if attn.use_rel_pos:
        pre = None if tables is None else tables.get(id(attn))
        terms = rel_pos_terms(q.float(), g, (d, h, w), attn.rel_pos_d.float(), attn.rel_pos_h.float(),
                              attn.rel_pos_w.float(), tables=pre)
        if flex:
            out = _flex_attention(q.device.type)(q_real, k, v, score_mod=rel_pos_score_mod(*terms, g, (d, h, w)))
        else:
            out = attention(q_real, k, v, bias_from_terms(*terms, g, (d, h, w)))
    else:
        out = attention(q_real, k, v, None)
    out = out.transpose(1, 2).reshape(b, d, h, w, c)
    return attn.proj(out)


def _attend_normed(block, y: torch.Tensor) -> torch.Tensor:
    """EncoderBlock._attend after its norm (the general windowed / sparse case)."""
    if not block.window_size:
        return block.attn(y)
    from .model.image_encoder import window_partition, window_unpartition
    size = y.shape[1:4]
    windows, padded = window_partition(y, block.window_size)
    return window_unpartition(block.attn(windows), block.window_size, padded, size)


def _encoder_block(block, x: torch.Tensor, flex: bool, tables: dict | None, cdt: torch.dtype) -> torch.Tensor:
    """EncoderBlock.forward with the residual stream x kept in float32 (norms in
    float32, matrix products in ``cdt``), as autocast would."""
    if block.has_attention:
        y = block.norm1(x).to(cdt)
        a = _attention(block.attn, y, block.window_size, flex, tables)
        x = x + (a if a is not None else _attend_normed(block, y))
    if block.formula == "prenorm":
        return x + block.mlp(block.norm2(x).to(cdt))
    x = block.norm2(x)
    return x + block.mlp(x.to(cdt))


def _standard_neck(neck: nn.Module) -> bool:
    return (isinstance(neck, nn.Sequential) and len(neck) == 4
            and isinstance(neck[0], nn.Conv3d) and tuple(neck[0].kernel_size) == (1, 1, 1)
            and isinstance(neck[1], LayerNorm3d) and isinstance(neck[2], nn.Conv3d)
            and isinstance(neck[3], LayerNorm3d))


def encoder_forward(encoder, x: torch.Tensor, flex: bool = False, tables: dict | None = None,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ImageEncoderViT3D.forward with the rewrites (same function). Matrix products
    run in ``compute_dtype`` (default: the patch embedding's weight dtype); the
    residual stream, norms and the returned embedding are float32 (the
    encoder's norms, position and relative-position parameters are expected in
    float32, see ``FastPath``)."""
    proj = encoder.patch_embed.proj
    cdt = compute_dtype or proj.weight.dtype
    p = proj.kernel_size[0]
    x = x.to(cdt)
    if _is_patch_conv(proj) and all(s % p == 0 for s in x.shape[2:]):
        x = F.linear(_patchify(x, p), proj.weight.reshape(proj.out_channels, -1), proj.bias)
    else:
        x = encoder.patch_embed(x)
    x = x.float() + encoder.pos_embed.float()
    for block in encoder.blocks:
        x = _encoder_block(block, x, flex, tables, cdt)
    neck = encoder.neck
    if not _standard_neck(neck):
        return neck(x.permute(0, 4, 1, 2, 3).to(cdt)).float()
    t = _channel_norm(neck[1], _conv_as_linear(neck[0], x.to(cdt)).float())
    y = neck[2](t.to(cdt).permute(0, 4, 1, 2, 3))        # the 3x3x3 conv: cuDNN, channels-last input
    t = _channel_norm(neck[3], y.permute(0, 2, 3, 4, 1).float())
    return t.permute(0, 4, 1, 2, 3).contiguous()


def _rel_pos_tables(encoder) -> dict:
    """id(attention module) -> its three float32 relative-position gathers (constants)."""
    tables = {}
    for block in encoder.blocks:
        if not block.has_attention or not block.attn.use_rel_pos:
            continue
        attn = block.attn
        grid = block.window_size or encoder.config.grid_size
        if attn.rel_pos_d.shape[0] != 2 * grid - 1:
            continue
        tables[id(attn)] = [relative_position_table(grid, t.detach().float())
                            for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)]
    return tables


def _trimmable_windows(encoder) -> bool:
    g = encoder.config.grid_size
    return any(b.has_attention and b.window_size and g < b.window_size for b in encoder.blocks)


_ENCODER_FP32_KEYS = ("norm", "neck.1.", "neck.3.", "pos_embed", "rel_pos")


# ---------------------------------------------------------------------------
# Decoder forward with the rewrites (same function as Sam3D.decode)
# ---------------------------------------------------------------------------

def _standard_mask_downscaling(seq: nn.Module) -> bool:
    return (isinstance(seq, nn.Sequential) and len(seq) == 7
            and _is_patch_conv(seq[0]) and isinstance(seq[1], LayerNorm3d) and isinstance(seq[2], nn.GELU)
            and _is_patch_conv(seq[3]) and isinstance(seq[4], LayerNorm3d) and isinstance(seq[5], nn.GELU)
            and _is_patch_conv(seq[6]))


def _standard_upscaling(seq: nn.Module) -> bool:
    return (isinstance(seq, nn.Sequential) and len(seq) == 5
            and _is_up_conv(seq[0]) and isinstance(seq[1], LayerNorm3d) and isinstance(seq[2], nn.GELU)
            and _is_up_conv(seq[3]) and isinstance(seq[4], nn.GELU))


def _gelu(module: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate=module.approximate)


def _mask_tokens(prompt_encoder, mask_logits: torch.Tensor) -> torch.Tensor:
    """mask_downscaling of (B, 1, s, s, s) logits as channels-last tokens (B, g, g, g, C)."""
    seq = prompt_encoder.mask_downscaling
    t = mask_logits.permute(0, 2, 3, 4, 1)
    t = _gelu(seq[2], _channel_norm(seq[1], _conv_as_linear(seq[0], t)))
    t = _gelu(seq[5], _channel_norm(seq[4], _conv_as_linear(seq[3], t)))
    return _conv_as_linear(seq[6], t)


def decoder_constants(mask_decoder) -> dict:
    """Input-independent tensors of the decoder, computed once."""
    seq = mask_decoder.output_upscaling
    out = {"output_tokens": torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], 0)}
    for i in (0, 3):
        conv = seq[i]
        k = conv.kernel_size[0]
        out[f"up{i}"] = (conv.weight.reshape(conv.in_channels, -1).t().contiguous(),
                         None if conv.bias is None else conv.bias.repeat_interleave(k ** 3))
    return {k: (tuple(t.detach() if t is not None else None for t in v) if isinstance(v, tuple) else v.detach())
            for k, v in out.items()}


def _up_conv_const(conv, tokens, const) -> torch.Tensor:
    if const is None:
        return _up_conv_as_linear(conv, tokens)
    weight, bias = const
    k = conv.kernel_size[0]
    b, d, h, w, _ = tokens.shape
    y = F.linear(tokens, weight, bias).reshape(b, d, h, w, conv.out_channels, k, k, k)
    return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, d * k, h * k, w * k, conv.out_channels)


def decoder_forward(prompt_encoder, mask_decoder, dense_pe_tokens: torch.Tensor,
                    embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                    mask_logits: torch.Tensor | None, multimask: bool, consts: dict | None = None):
    """Sam3D.decode (prompt encoder + mask decoder) on channels-last tokens.

    dense_pe_tokens (1, g^3, C): the prompt encoder's dense positional encoding,
    computed once. Returns (low-res logits, iou) in the decoder's dtype."""
    dtype = mask_decoder.iou_token.weight.dtype
    b = points.shape[0]
    sparse = prompt_encoder.embed_points(points, labels).to(dtype)
    _, c, gd, gh, gw = embedding.shape
    emb_tokens = embedding.to(dtype).flatten(2).transpose(1, 2)          # (1|B, g^3, C)
    if mask_logits is None:
        keys = emb_tokens + prompt_encoder.no_mask_embed.weight.to(dtype)
        keys = keys.expand(b, -1, -1)
    else:
        dense = _mask_tokens(prompt_encoder, mask_logits.to(dtype)).reshape(b, gd * gh * gw, c)
        keys = emb_tokens + dense
    consts = consts or {}
    output_tokens = consts.get("output_tokens")
    if output_tokens is None:
        output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(b, -1, -1), sparse], dim=1)
    key_pe = dense_pe_tokens.to(dtype)

    tf = mask_decoder.transformer
    queries = tokens
    for layer in tf.layers:
        queries, keys = layer(queries, keys, tokens, key_pe)
    q, k = queries + tokens, keys + key_pe
    hs = tf.norm_final_attn(queries + tf.final_attn_token_to_image(q, k, keys))

    seq = mask_decoder.output_upscaling
    up = keys.reshape(b, gd, gh, gw, c)
    up = _gelu(seq[2], _channel_norm(seq[1], _up_conv_const(seq[0], up, consts.get("up0"))))
    up = _gelu(seq[4], _up_conv_const(seq[3], up, consts.get("up3")))  # (B, 4g, 4g, 4g, C/8)
    bu, du, hu, wu, cu = up.shape
    selected = range(1, mask_decoder.num_mask_tokens) if multimask else range(0, 1)
    hyper_in = torch.stack([mask_decoder.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in selected],
                           dim=1)                                         # (B, k, C/8)
    masks = (hyper_in @ up.reshape(bu, du * hu * wu, cu).transpose(1, 2)).reshape(bu, -1, du, hu, wu)
    iou = mask_decoder.iou_prediction_head(hs[:, 0])
    iou = iou[:, 1:] if multimask else iou[:, :1]
    return masks, iou


def _decoder_rewritable(prompt_encoder, mask_decoder) -> bool:
    return (_standard_mask_downscaling(prompt_encoder.mask_downscaling)
            and _standard_upscaling(mask_decoder.output_upscaling))


# ---------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------

@dataclass
class _Graph:
    graph: object
    inputs: tuple
    outputs: tuple


@dataclass
class FastStats:
    capture_s: dict = field(default_factory=dict)    # what -> seconds of warm-up + compile + capture
    replays: int = 0
    eager_calls: int = 0


class FastPath:
    """Sam3D's encode/decode, fast. See the module docstring.

    model: a Sam3D (left untouched: weights are copied where a dtype or device
    differs, shared otherwise). dtype: the encoder's precision (default bf16 on
    CUDA where supported, else fp16; always float32 on the CPU).
    """

    def __init__(self, model, device=None, dtype: torch.dtype | None = None,
                 options: FastOptions | None = None):
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        self.options = (options or FastOptions()).for_device(self.device)
        if dtype is None:
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
        if not cuda:
            dtype = torch.float32
        self.dtype = dtype
        self.decoder_dtype = self.options.decoder_dtype or dtype
        if not cuda:
            self.decoder_dtype = torch.float32
        self.model = model
        self.config = model.config
        rewrites = self.options.rewrites
        self.rewrite_encoder = bool(rewrites) or (rewrites is None and (cuda or _trimmable_windows(
            model.image_encoder)))
        # With the rewrites the residual stream, norms, position and relative-position
        # parameters stay float32 (as under autocast); only matrix products run in dtype.
        keep = _ENCODER_FP32_KEYS if self.rewrite_encoder else ()
        self.encoder = _module_in(model.image_encoder, self.device, self.dtype, keep)
        # Buffers keep their dtype: the prompt encoder's Fourier matrix stays float32.
        self.prompt_encoder = _module_in(model.prompt_encoder, self.device, self.decoder_dtype)
        self.mask_decoder = _module_in(model.mask_decoder, self.device, self.decoder_dtype)
        tf32 = self.options.decoder_tf32
        self.decoder_tf32 = (cuda and self.dtype != torch.float32 and self.decoder_dtype == torch.float32
                             if tf32 is None else bool(tf32) and cuda)
        with torch.inference_mode():
            dense_pe = model.prompt_encoder.pe_layer.dense(model.config.image_embedding_size)
            dense_pe = dense_pe.to(self.device)[None]                              # (1, C, g, g, g) fp32
            self.dense_pe = dense_pe.to(self.decoder_dtype)
            self.dense_pe_tokens = dense_pe.flatten(2).transpose(1, 2).to(self.decoder_dtype).contiguous()
            self.rewrite_decoder = rewrites is not False and _decoder_rewritable(self.prompt_encoder,
                                                                                self.mask_decoder)
            self.decoder_consts = decoder_constants(self.mask_decoder) if self.rewrite_decoder else {}
            self.rel_tables = _rel_pos_tables(self.encoder) if self.rewrite_encoder else {}
            self.rel_tables = {k: [t.to(self.device) for t in v] for k, v in self.rel_tables.items()}
        self._graphs: dict = {}
        self._pool = None
        self._compiled: dict = {}
        self._uploads: dict = {}
        self.stats = FastStats()

    @property
    def graphs_enabled(self) -> bool:
        return self.options.graphs and self.device.type == "cuda"

    def describe(self) -> str:
        o = self.options
        parts = [str(self.dtype).replace("torch.", "") + " encoder",
                 str(self.decoder_dtype).replace("torch.", "") + " decoder"]
        if self.graphs_enabled:
            parts.append("CUDA graphs")
        if o.compile:
            parts.append(f"compile:{o.compile}")
        if o.attention == "flex":
            parts.append("FlexAttention")
        if self.rewrite_encoder or self.rewrite_decoder:
            parts.append("rewrites")
        if self.decoder_tf32:
            parts.append("TF32 decoder")
        return ", ".join(parts)

    # -- plain (uncaptured) computations -------------------------------------
    def _encode_impl(self, volume: torch.Tensor) -> torch.Tensor:
        if self.rewrite_encoder:
            return encoder_forward(self.encoder, volume, flex=self.options.attention == "flex",
                                   tables=self.rel_tables, compute_dtype=self.dtype)
        if self.device.type == "cpu":
            return self.model.encode(volume)        # the plain model call, as the Engine always made
        return self.encoder(volume.to(self.dtype))

    def _decode_impl(self, embedding, points, labels, mask_logits, multimask: bool):
        if self.rewrite_decoder:
            logits, iou = decoder_forward(self.prompt_encoder, self.mask_decoder, self.dense_pe_tokens,
                                          embedding, points, labels, mask_logits, multimask,
                                          self.decoder_consts)
        else:
            dtype = self.decoder_dtype
            sparse = self.prompt_encoder.embed_points(points, labels).to(dtype)
            mask = None if mask_logits is None else mask_logits.to(dtype)
            dense = self.prompt_encoder.embed_mask(mask, points.shape[0])
            logits, iou = self.mask_decoder(embedding.to(dtype), self.dense_pe, sparse, dense, multimask)
        return logits.float(), iou.float()

    def _decode_up_impl(self, embedding, points, labels, mask_logits):
        logits, iou = self._decode_impl(embedding, points, labels, mask_logits, False)
        s = self.config.encoder.img_size
        mask = F.interpolate(logits, size=(s, s, s), mode="trilinear", align_corners=False) > 0
        return logits, iou, mask

    def _fn(self, what: str):
        """The (optionally compiled) function of ``what`` ("encode", "decode", "decode_up")."""
        fn = {"encode": self._encode_impl, "decode": self._decode_impl,
              "decode_up": self._decode_up_impl}[what]
        mode = self.options.compile
        if not mode:
            return fn
        if what not in self._compiled:
            kwargs = {"dynamic": False, "fullgraph": False}
            if mode != "default":
                kwargs["mode"] = mode
            self._compiled[what] = torch.compile(fn, **kwargs)
        return self._compiled[what]

    # -- graphs --------------------------------------------------------------
    def _capture(self, key, fn, inputs: tuple, tf32: bool = False) -> _Graph:
        started = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with _matmul_flags(tf32), torch.cuda.stream(stream):
            for _ in range(max(1, self.options.warmup)):
                fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # One pool for all graphs: they replay one at a time on one stream and every
        # output is cloned before the next replay, so reusing each other's
        # temporaries is safe. The math flags in force are baked into the graph.
        with _matmul_flags(tf32), torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*inputs)
        torch.cuda.synchronize(self.device)
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        entry = _Graph(graph, inputs, outputs)
        self._graphs[key] = entry
        self.stats.capture_s[str(key)] = time.perf_counter() - started
        return entry

    def _replay(self, entry: _Graph, values: tuple):
        stream = torch.cuda.current_stream(self.device)
        staged = []
        for i, (buffer, value) in enumerate(zip(entry.inputs, values)):
            if value is None:
                continue
            if value.device.type == "cpu" and not value.is_pinned():
                upload = self._uploads.setdefault((id(entry), i), _PinnedUpload())
                value = upload.stage(value)
                staged.append(upload)
            buffer.copy_(value, non_blocking=True)
        for upload in staged:
            upload.uploaded(stream)
        entry.graph.replay()
        self.stats.replays += 1
        return tuple(o.clone() for o in entry.outputs)

    def _encoder_graph(self) -> _Graph:
        key = ("encode",)
        if key not in self._graphs:
            s = self.config.encoder.img_size
            volume = torch.randn(1, self.config.encoder.in_chans, s, s, s, device=self.device)
            self._capture(key, self._fn("encode"), (volume,))
            for n in range(1, self.options.precapture_points + 1):
                self._decoder_graph(n, multimask=False, has_mask=True)
        return self._graphs[key]

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype ``encode`` returns (float32 with the rewrites: their final norm is float32)."""
        return torch.float32 if self.rewrite_encoder else self.dtype

    def _decoder_inputs(self, n_points: int, has_mask: bool) -> tuple:
        g = self.config.image_embedding_size
        s = 4 * g
        embedding = torch.randn(1, self.config.prompt_embed_dim, g, g, g, device=self.device,
                                dtype=self.embedding_dtype)
        points = torch.rand(1, n_points, 3, device=self.device) * (self.config.encoder.img_size - 1)
        labels = torch.ones(1, n_points, dtype=torch.int64, device=self.device)
        mask = torch.randn(1, 1, s, s, s, device=self.device) if has_mask else None
        return embedding, points, labels, mask

    def _decoder_graph(self, n_points: int, multimask: bool, has_mask: bool, upsampled: bool = False) -> _Graph:
        key = ("decode_up" if upsampled else "decode", n_points, multimask, has_mask)
        if key in self._graphs:
            return self._graphs[key]
        if upsampled:
            return self._capture(key, self._fn("decode_up"), self._decoder_inputs(n_points, has_mask),
                                 self.decoder_tf32)
        fn = self._fn("decode")
        return self._capture(key, lambda e, p, lab, m: fn(e, p, lab, m, multimask),
                             self._decoder_inputs(n_points, has_mask), self.decoder_tf32)

    # -- public API ----------------------------------------------------------
    @torch.inference_mode()
    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S, S) crop (any device, float) -> embedding (1, C, g, g, g) in ``dtype``."""
        s = self.config.encoder.img_size
        expected = (1, self.config.encoder.in_chans, s, s, s)
        if self.graphs_enabled and tuple(volume.shape) == expected:
            entry = self._encoder_graph()
            return self._replay(entry, (volume.float(),))[0]
        self.stats.eager_calls += 1
        with _matmul_flags(False, self.device):
            return self._fn("encode")(volume.to(self.device))

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sam3D.decode: low-res logits (B, 1|3, s, s, s) and IoU (B, 1|3), both float32."""
        g = self.config.image_embedding_size
        batch, n_points = points.shape[0], points.shape[1]
        if (self.graphs_enabled and batch == 1 and embedding.shape[0] == 1
                and tuple(embedding.shape[2:]) == (g, g, g)
                and (mask_logits is None or tuple(mask_logits.shape) == (1, 1, 4 * g, 4 * g, 4 * g))):
            entry = self._decoder_graph(n_points, bool(multimask), mask_logits is not None)
            return self._replay(entry, (embedding, points.float(), labels.long(), mask_logits))
        self.stats.eager_calls += 1
        dev = self.device
        mask = None if mask_logits is None else mask_logits.to(dev)
        with _matmul_flags(self.decoder_tf32, dev):
            return self._fn("decode")(embedding.to(dev), points.to(dev).float(), labels.to(dev).long(), mask,
                                      bool(multimask))

    @torch.inference_mode()
    def decode_upsampled(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                         mask_logits: torch.Tensor | None = None):
        """decode (single mask) plus the reference pipelines' crop-space prediction:
        (low-res logits, iou, bool mask (B, 1, S, S, S) = trilinear upsample > 0)."""
        g = self.config.image_embedding_size
        if (self.graphs_enabled and points.shape[0] == 1 and embedding.shape[0] == 1
                and tuple(embedding.shape[2:]) == (g, g, g)
                and (mask_logits is None or tuple(mask_logits.shape) == (1, 1, 4 * g, 4 * g, 4 * g))):
            entry = self._decoder_graph(points.shape[1], False, mask_logits is not None, upsampled=True)
            return self._replay(entry, (embedding, points.float(), labels.long(), mask_logits))
        self.stats.eager_calls += 1
        dev = self.device
        mask = None if mask_logits is None else mask_logits.to(dev)
        with _matmul_flags(self.decoder_tf32, dev):
            return self._fn("decode_up")(embedding.to(dev), points.to(dev).float(), labels.to(dev).long(), mask)

    def warm_up(self, max_points: int = 0) -> None:
        """Capture the encoder graph and the decoder graphs for 1..max_points points now."""
        if not self.graphs_enabled:
            return
        with torch.inference_mode():
            self._encoder_graph()
            for n in range(1, max_points + 1):
                self._decoder_graph(n, multimask=False, has_mask=True)

    def release(self) -> None:
        self._graphs.clear()
        self._pool = None
        self._compiled.clear()


def _module_in(module: nn.Module, device: torch.device, dtype: torch.dtype, keep_fp32=()) -> nn.Module:
    """``module`` itself if its parameters already live there in that dtype, else a
    copy with converted parameters (those whose name contains one of
    ``keep_fp32`` in float32; buffers only moved), made without a transient
    full-precision copy on the device."""
    named = list(module.named_parameters())
    buffers = list(module.buffers())

    def target(name):
        return torch.float32 if any(k in name for k in keep_fp32) else dtype
    if all(p.device == device and p.dtype == target(n) for n, p in named) and all(
            b.device == device for b in buffers):
        return module
    memo = {}
    for name, p in named:
        memo[id(p)] = nn.Parameter(p.detach().to(device=device, dtype=target(name)), requires_grad=False)
    for b in buffers:
        memo[id(b)] = b.detach().to(device=device)
    return copy.deepcopy(module, memo).eval()


@contextlib.contextmanager
def _matmul_flags(tf32: bool, device: torch.device | None = None):
    """TF32 for float32 matrix products and convolutions on (tf32) or off, restored after."""
    if device is not None and device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class _PinnedUpload:
    """A reused page-locked buffer for asynchronous uploads of one shape."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.done: torch.cuda.Event | None = None

    def stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or self.buffer.shape != tensor.shape or self.buffer.dtype != tensor.dtype:
            self.buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.done = None
        if self.done is not None:
            self.done.synchronize()           # the previous upload has left the buffer
        self.buffer.copy_(tensor)
        return self.buffer

    def uploaded(self, stream) -> None:
        self.done = torch.cuda.Event()
        self.done.record(stream)


def accelerate(model, device=None, dtype: torch.dtype | None = None, **options) -> FastPath:
    """FastPath(model, device, dtype, FastOptions(**options))."""
    return FastPath(model, device, dtype, FastOptions(**options))


# ---------------------------------------------------------------------------
# Paste-back: the low-res logits evaluated only on the image sub-box they can change
# ---------------------------------------------------------------------------

def _grid_affine(image, roi) -> tuple[np.ndarray, np.ndarray]:
    """(T (3, 3), offset (3,)): grid_sample coordinate (x, y, z) = T @ (i, j, k) + offset,
    as ``roi.logits_on_image`` computes it."""
    from .roi import ROI_DIRECTION
    direction = np.array(image.GetDirection()).reshape(3, 3)
    linear = ROI_DIRECTION[:, None] * (direction * np.array(image.GetSpacing())) / roi.spacing
    offset = ROI_DIRECTION * (np.array(image.GetOrigin()) - roi.origin_lps) / roi.spacing
    scale = 2.0 / roi.size
    return (scale * linear)[::-1].copy(), (scale * (offset + 0.5) - 1)[::-1].copy()


def _axis_aligned(image, roi):
    """For an image whose axes map one-to-one onto the ROI's (a signed
    permutation: no obliquity), [(image index component, scale, offset)] per ROI
    axis with ROI voxel v_r = scale * index + offset; else None."""
    from .roi import ROI_DIRECTION
    direction = np.array(image.GetDirection()).reshape(3, 3)
    linear = ROI_DIRECTION[:, None] * (direction * np.array(image.GetSpacing())) / roi.spacing
    offset = ROI_DIRECTION * (np.array(image.GetOrigin()) - roi.origin_lps) / roi.spacing
    big = np.abs(linear) > 1e-9 * np.abs(linear).max()
    if not (big.sum(axis=0) == 1).all() or not (big.sum(axis=1) == 1).all():
        return None
    return [(int(np.flatnonzero(big[r])[0]), float(linear[r][big[r]][0]), float(offset[r])) for r in range(3)]


def mask_on_box_separable(image, roi, low_res_logits: torch.Tensor, box) -> torch.Tensor | None:
    """``roi.logits_on_image(image, roi, logits, box) > 0`` for an image whose
    axes are aligned with the ROI's (None otherwise): trilinear interpolation with
    clamped edges is then a product of three 1D linear interpolations, so the box
    is three small matrix products of the (s, s, s) logits (float rounding aside,
    the same values as grid_sample; the inside test |n| <= 1 + 1e-6 of
    logits_on_image is applied per axis)."""
    axes = _axis_aligned(image, roi)
    if axes is None:
        return None
    s = low_res_logits.shape[-1]
    logits = low_res_logits.reshape(s, s, s).float()
    start, stop = (np.asarray(b, dtype=np.int64) for b in box)
    size = roi.size
    letters = "kji"                                  # array dims 0, 1, 2 = index components k, j, i
    weights, subscripts = [], []
    for component, scale, offset in axes:
        dim = 2 - component
        t = np.arange(start[dim], stop[dim], dtype=np.float64)
        v = scale * t + offset                       # ROI voxel coordinate
        n = (2.0 * v + 1.0) / size - 1.0             # grid_sample's normalised coordinate
        u = np.clip(((n + 1.0) * s - 1.0) / 2.0, 0.0, s - 1.0)
        lo = np.floor(u).astype(np.int64)
        hi = np.minimum(lo + 1, s - 1)
        frac = u - lo
        inside = np.abs(n) <= 1.0 + 1e-6
        w = np.zeros((t.size, s), dtype=np.float32)
        rows = np.arange(t.size)
        np.add.at(w, (rows, lo), np.where(inside, 1.0 - frac, 0.0))
        np.add.at(w, (rows, hi), np.where(inside, frac, 0.0))
        weights.append(w)
        subscripts.append(letters[dim])
    sizes = [w.shape[0] for w in weights]
    packed = torch.from_numpy(np.concatenate([w.reshape(-1) for w in weights]))
    packed = packed.to(logits.device, non_blocking=False)
    w0, w1, w2 = torch.split(packed, [n * s for n in sizes])
    w0, w1, w2 = (w.reshape(n, s) for w, n in zip((w0, w1, w2), sizes))
    expr = f"xyz,{subscripts[0]}x,{subscripts[1]}y,{subscripts[2]}z->kji"
    return torch.einsum(expr, logits, w0, w1, w2) > 0


_TRITON_KERNEL = None


def _triton_kernel():
    """One Triton kernel computing ``roi.logits_on_image(...) > 0`` over a box
    (None where Triton is missing)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL or None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON_KERNEL = False
        return None

    @triton.jit
    def mask_kernel(logits_ptr, out_ptr, n_total, dj, di, k0, j0, i0, s,
                    t00, t01, t02, t10, t11, t12, t20, t21, t22, o0, o1, o2,
                    BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_total
        plane = dj * di
        k = (offs // plane + k0).to(tl.float32)
        rem = offs % plane
        j = (rem // di + j0).to(tl.float32)
        i = (rem % di + i0).to(tl.float32)
        # grid_sample coordinates (x, y, z) <-> tensor axes (2, 1, 0)
        x = i * t00 + j * t01 + o0 + k * t02
        y = i * t10 + j * t11 + o1 + k * t12
        z = i * t20 + j * t21 + o2 + k * t22
        lim = 1.0 + 1e-6
        inside = (tl.abs(x) <= lim) & (tl.abs(y) <= lim) & (tl.abs(z) <= lim)
        sf = s.to(tl.float32)
        ux = tl.minimum(tl.maximum(((x + 1.0) * sf - 1.0) * 0.5, 0.0), sf - 1.0)
        uy = tl.minimum(tl.maximum(((y + 1.0) * sf - 1.0) * 0.5, 0.0), sf - 1.0)
        uz = tl.minimum(tl.maximum(((z + 1.0) * sf - 1.0) * 0.5, 0.0), sf - 1.0)
        fx = tl.floor(ux)
        fy = tl.floor(uy)
        fz = tl.floor(uz)
        wx = ux - fx
        wy = uy - fy
        wz = uz - fz
        ax = fx.to(tl.int32)
        ay = fy.to(tl.int32)
        az = fz.to(tl.int32)
        bx = tl.minimum(ax + 1, s - 1)
        by = tl.minimum(ay + 1, s - 1)
        bz = tl.minimum(az + 1, s - 1)
        m = valid & inside
        v000 = tl.load(logits_ptr + (az * s + ay) * s + ax, mask=m, other=0.0)
        v001 = tl.load(logits_ptr + (az * s + ay) * s + bx, mask=m, other=0.0)
        v010 = tl.load(logits_ptr + (az * s + by) * s + ax, mask=m, other=0.0)
        v011 = tl.load(logits_ptr + (az * s + by) * s + bx, mask=m, other=0.0)
        v100 = tl.load(logits_ptr + (bz * s + ay) * s + ax, mask=m, other=0.0)
        v101 = tl.load(logits_ptr + (bz * s + ay) * s + bx, mask=m, other=0.0)
        v110 = tl.load(logits_ptr + (bz * s + by) * s + ax, mask=m, other=0.0)
        v111 = tl.load(logits_ptr + (bz * s + by) * s + bx, mask=m, other=0.0)
        c00 = v000 * (1.0 - wx) + v001 * wx
        c01 = v010 * (1.0 - wx) + v011 * wx
        c10 = v100 * (1.0 - wx) + v101 * wx
        c11 = v110 * (1.0 - wx) + v111 * wx
        val = (c00 * (1.0 - wy) + c01 * wy) * (1.0 - wz) + (c10 * (1.0 - wy) + c11 * wy) * wz
        tl.store(out_ptr + offs, (m & (val > 0.0)).to(tl.int8), mask=valid)

    _TRITON_KERNEL = mask_kernel
    return mask_kernel


def mask_on_box_triton(image, roi, low_res_logits: torch.Tensor, box) -> torch.Tensor | None:
    """``roi.logits_on_image(image, roi, logits, box) > 0`` as one Triton kernel
    (CUDA only; None where not available). Equal up to float rounding of values
    within ~1e-6 of 0."""
    if low_res_logits.device.type != "cuda":
        return None
    kernel = _triton_kernel()
    if kernel is None:
        return None
    s = low_res_logits.shape[-1]
    logits = low_res_logits.reshape(s, s, s).float().contiguous()
    (k0, j0, i0), stop = box
    shape = tuple(int(b - a) for a, b in zip(box[0], stop))
    out = torch.empty(shape, dtype=torch.bool, device=logits.device)
    n = out.numel()
    if n == 0:
        return out
    t, o = _grid_affine(image, roi)
    block = 1024
    kernel[((n + block - 1) // block,)](
        logits, out.view(torch.int8), n, shape[1], shape[2], int(k0), int(j0), int(i0), s,
        *[float(v) for v in t.reshape(-1)], *[float(v) for v in o], BLOCK=block)
    return out


class MaskPaster:
    """``roi.logits_to_patch`` with faster kernels: low-res logits of a ROI ->
    ``MaskPatch`` of the image over ``box`` (default: only the sub-box the mask
    can occupy, ``roi.positive_box_on_image``). method: "separable" (images aligned with the ROI's axes: three
    small matrix products), "triton" (CUDA: one kernel, any orientation),
    "grid_sample" (roi's own chunked code), "auto" (the first that applies).
    On CUDA the bool box comes back through a reused page-locked buffer
    (``pinned``)."""

    METHODS = ("auto", "separable", "triton", "grid_sample")

    def __init__(self, method: str = "auto", pinned: bool = True):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {', '.join(self.METHODS)}")
        self.method = method
        self.pinned = pinned
        self._host: torch.Tensor | None = None

    def _staging(self, n: int) -> torch.Tensor:
        if self._host is None or self._host.numel() < n:
            self._host = torch.empty(max(n, 1 << 22), dtype=torch.bool, pin_memory=True)
        return self._host[:n]

    def __call__(self, image, roi, low_res_logits: torch.Tensor, box=None):
        """``roi.logits_to_patch(image, roi, logits, box)``; box None: the
        positive box (``roi.positive_box_on_image``) instead of the whole ROI's."""
        from .roi import MaskPatch, logits_on_image, positive_box_on_image, roi_box_on_image
        box = positive_box_on_image(image, roi, low_res_logits) if box is None else box
        if box is None:
            roi_box = roi_box_on_image(image, roi)
            return MaskPatch((0, 0, 0) if roi_box is None else roi_box[0], np.zeros((0, 0, 0), dtype=bool))
        mask = None
        cuda = low_res_logits.device.type == "cuda"
        # Measured (docs/performance.md): on the CPU the separable path is 10x faster than
        # grid_sample; on CUDA the Triton kernel wins alone (1.3 vs 2.0 ms) but not inside the
        # Engine, and it JIT-compiles per shape specialisation, so "auto" keeps grid_sample there.
        order = {"auto": () if cuda else ("separable",),
                 "separable": ("separable",), "triton": ("triton",), "grid_sample": ()}[self.method]
        for method in order:
            fn = mask_on_box_triton if method == "triton" else mask_on_box_separable
            mask = fn(image, roi, low_res_logits, box)
            if mask is not None:
                break
        if mask is None:
            mask = logits_on_image(image, roi, low_res_logits, box) > 0
        if mask.device.type == "cpu":
            return MaskPatch(box[0], mask.numpy())
        if not self.pinned:
            return MaskPatch(box[0], mask.cpu().numpy())
        host = self._staging(mask.numel())
        host.copy_(mask.reshape(-1), non_blocking=True)
        torch.cuda.current_stream(mask.device).synchronize()
        return MaskPatch(box[0], host.numpy().reshape(mask.shape).copy())


def logits_to_patch_fast(image, roi, low_res_logits: torch.Tensor, box=None):
    """Drop-in for ``roi.logits_to_patch`` (see ``MaskPaster``)."""
    return _DEFAULT_PASTER(image, roi, low_res_logits, box)


_DEFAULT_PASTER = MaskPaster()


# ---------------------------------------------------------------------------
# How the Engine chooses
# ---------------------------------------------------------------------------

FAST_CHOICES = ("auto", "on", "off", "compile")


def engine_fast_path(model, device: torch.device, precision: torch.dtype, fast="auto") -> FastPath | None:
    """The Engine's fast path, or None for the plain model calls.

    fast: "auto" / True / "on": on CUDA a FastPath in the Engine's precision
    (bf16 encoder matrix products with a float32 residual stream, float32
    decoder on TF32 tensor cores, CUDA graphs, layout rewrites); on the CPU a
    float32 FastPath without graphs whose decoder (and a windowed encoder)
    use the rewrites, the student encoder the plain model call. "compile": the
    same plus torch.compile on CUDA (tens of seconds at start). "off" / False:
    the plain model calls everywhere."""
    if fast is True:
        fast = "on"
    if fast is False or fast is None:
        fast = "off"
    if fast not in FAST_CHOICES:
        raise ValueError(f"fast must be one of {', '.join(FAST_CHOICES)}, got {fast!r}")
    if fast == "off":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return FastPath(model, device, torch.float32, FastOptions())
    options = FastOptions(compile="default" if fast == "compile" else None, precapture_points=4)
    return FastPath(model, device, precision, options)
