"""Speed benchmark: ``python -m FastSAM3DLib.bench``.

One process times, for each model and precision, the plain model calls and
the fast path (``acceleration.py``): the image encoder, one decoder click (prompt
encoder + mask decoder; and with the reference's 128^3 upsample + threshold),
click-to-mask through the Engine on a 512x512x300 CT-sized image (ROI reuse,
decode, paste-back onto the image grid in host memory), the paste-back alone,
and peak GPU memory. With ``--reference DIR`` (a local copy of the upstream
repositories, DIR/SAM-Med3D and DIR/FastSAM3D; the project never ships their
code) the reference implementation's encoder and decoder are timed in the same
run with the same weights, their outputs checked against ours, and speed
ratios printed.

Weights are random (seeded; every parameter non-zero, relative positions
included); inputs are several random sets rotated through the repeats. GPU
times are CUDA-event medians after warm-up, each call synchronised; CPU times
are wall-clock medians. Prints a table, writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import platform
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .acceleration import FastOptions, FastPath, MaskPaster, _matmul_flags
from .model import NAMED_CONFIGS, EncoderConfig, ModelConfig, Sam3D

TINY = ModelConfig(name="tiny", encoder=EncoderConfig(
    img_size=64, embed_dim=48, depth=3, num_heads=2, window_size=0, global_attn_indexes=(),
    attention_free_blocks=1, block_formula="fastsam3d"))
TINY_WINDOWED = ModelConfig(name="tiny-windowed", encoder=EncoderConfig(
    img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=6, global_attn_indexes=(1,)))


# ---------------------------------------------------------------------------
# weights, inputs, metrics
# ---------------------------------------------------------------------------

def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights with realistic scales, none zero (relative positions
    and position embeddings included, so every term of the model is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf.startswith("rel_pos"):
                value = torch.randn(p.shape, generator=gen) * 0.1
            elif leaf == "pos_embed":
                value = torch.randn(p.shape, generator=gen) * 0.02
            elif any(k in name for k in ("point_embeddings", "not_a_point_embed", "no_mask_embed",
                                         "iou_token", "mask_tokens")):
                value = torch.randn(p.shape, generator=gen)
            elif leaf == "weight" and p.dim() == 1:
                value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            elif leaf == "bias":
                value = 0.02 * torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel()))
            p.copy_(value)
        for name, b in model.named_buffers():         # the prompt encoder's Fourier matrix
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen))
    return model


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the parity tests' metric)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool().cpu(), b.bool().cpu()
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def upsampled_mask(logits: torch.Tensor, size: int) -> torch.Tensor:
    """The reference pipelines' prediction: trilinear upsample to the crop, > 0."""
    return F.interpolate(logits.float(), size=(size,) * 3, mode="trilinear", align_corners=False) > 0


@dataclass
class Inputs:
    volumes: list
    points: list
    labels: list
    masks: list


def make_inputs(config: ModelConfig, device, sets: int, seed: int = 1, n_points: int = 1) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    s, low = config.encoder.img_size, 4 * config.image_embedding_size
    vols, pts, labs, masks = [], [], [], []
    for _ in range(sets):
        vols.append(torch.randn(1, 1, s, s, s, generator=gen).to(device))
        pts.append((torch.rand(1, n_points, 3, generator=gen) * (s * 0.7) + s * 0.15))
        labs.append(torch.randint(0, 2, (1, n_points), generator=gen).clamp_min(1 if n_points == 1 else 0))
        masks.append((torch.randn(1, 1, low, low, low, generator=gen) * 2).to(device))
    return Inputs(vols, pts, labs, masks)


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, args_list, device, warmup: int, repeats: int) -> dict:
    """Median (and p10/p90) of ``fn(*args)`` over repeats, rotating the input sets.
    CUDA: events around each call, synchronised after it; CPU: wall clock."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    _sync(device)
    times, walls = [], []
    for i in range(repeats):
        args = args_list[i % len(args_list)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            walls.append((time.perf_counter() - t0) * 1e3)
            times.append(walls[-1])
    t = np.array(times)
    return {"ms": float(np.median(t)), "p10": float(np.percentile(t, 10)),
            "p90": float(np.percentile(t, 90)), "wall_ms": float(np.median(walls)), "n": repeats}


@contextlib.contextmanager
def peak_memory(device, into: dict):
    """Peak GPU memory (MB) above what was allocated on entry."""
    if device.type != "cuda":
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        torch.cuda.synchronize(device)
        into["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


# ---------------------------------------------------------------------------
# reference implementation (loaded from the user's local copy, never shipped)
# ---------------------------------------------------------------------------

def _load_modeling(alias: str, folder: Path) -> dict:
    """Import an upstream ``segment_anything/modeling`` folder as package ``alias``
    without running its __init__ (which pulls in unrelated 2D code)."""
    pkg = types.ModuleType(alias)
    pkg.__path__ = [str(folder)]
    sys.modules[alias] = pkg
    mods = {}
    for name in ("common", "image_encoder3D", "prompt_encoder3D", "mask_decoder3D"):
        if (folder / f"{name}.py").exists():
            mods[name] = importlib.import_module(f"{alias}.{name}")
    return mods


def _modeling_dir(root: Path, repo: str) -> Path:
    for candidate in (root / repo / "segment_anything" / "modeling", root / repo / "modeling", root / repo):
        if (candidate / "image_encoder3D.py").exists():
            return candidate
    raise FileNotFoundError(f"no {repo}/segment_anything/modeling/image_encoder3D.py under {root}")


class Reference:
    """The upstream modules for one of our configurations, holding our weights."""

    def __init__(self, root: Path, config: ModelConfig, state: dict, device):
        sm = _load_modeling("bench_ref_sammed3d", _modeling_dir(root, "SAM-Med3D"))
        e = config.encoder
        common = dict(img_size=e.img_size, patch_size=e.patch_size, mlp_ratio=e.mlp_ratio,
                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                      use_rel_pos=e.use_rel_pos, out_chans=e.out_chans, embed_dim=e.embed_dim,
                      depth=e.depth, num_heads=e.num_heads)
        self.list_output = False
        if config.name == "fastsam3d":
            fs = _load_modeling("bench_ref_fastsam3d", _modeling_dir(root, "FastSAM3D"))
            self.encoder = fs["image_encoder3D"].ImageEncoderViT3D(
                global_attn_indexes=[2, 5, 8, 11], window_size=0, skip_layer=e.attention_free_blocks, **common)
            self.list_output = True
        elif config.name == "sam-med3d":
            self.encoder = sm["image_encoder3D"].ImageEncoderViT3D(
                global_attn_indexes=list(e.global_attn_indexes), window_size=e.window_size, **common)
        else:
            raise ValueError(f"no reference for configuration {config.name}")
        g = config.image_embedding_size
        self.prompt_encoder = sm["prompt_encoder3D"].PromptEncoder3D(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(g, g, g),
            input_image_size=(e.img_size,) * 3, mask_in_chans=config.mask_in_chans)
        self.mask_decoder = sm["mask_decoder3D"].MaskDecoder3D(
            num_multimask_outputs=3, transformer_dim=config.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=256)
        for prefix, module in (("image_encoder.", self.encoder), ("prompt_encoder.", self.prompt_encoder),
                               ("mask_decoder.", self.mask_decoder)):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)
            module.eval().to(device)
        self.size = e.img_size

    def encode(self, volume):
        out = self.encoder(volume)
        return out[-1] if self.list_output else out

    def decode(self, embedding, points, labels, mask):
        sparse, dense = self.prompt_encoder(points=[points, labels], boxes=None, masks=mask)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)

    def click(self, embedding, points, labels, mask):
        low, _ = self.decode(embedding, points, labels, mask)
        return upsampled_mask(low, self.size)


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    stage: str
    variant: str
    precision: str
    ms: float | None = None
    p10: float | None = None
    p90: float | None = None
    wall_ms: float | None = None
    n: int = 0
    err: float | None = None          # max |x - fp32| / max |fp32| of the stage's output
    err_l2: float | None = None
    dice: float | None = None         # binary masks against fp32 (128^3 upsample, > 0)
    peak_mb: float | None = None
    setup_s: float | None = None      # warm-up + compile + capture
    vs_ref: float | None = None       # reference fp32 eager ms / this ms
    vs_eager: float | None = None     # our fp32 eager ms / this ms
    note: str = ""


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.rows: list[Row] = []
        self.checks: dict = {}
        self.started = time.perf_counter()
        self.reference_root = Path(args.reference) if args.reference else None
        self.ctx: dict = {}

    # -- helpers --
    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {msg}", flush=True)

    def add(self, row: Row, timing: dict | None = None) -> Row:
        if timing:
            for k in ("ms", "p10", "p90", "wall_ms", "n"):
                setattr(row, k, timing[k])
        self.rows.append(row)
        self.log(f"{row.model:10s} {row.stage:14s} {row.variant:34s} {row.precision:5s} "
                 f"{'' if row.ms is None else f'{row.ms:9.3f} ms'} "
                 f"{'' if row.err is None else f'err {row.err:.1e}'} "
                 f"{'' if row.err_l2 is None else f'(L2 {row.err_l2:.1e})'} "
                 f"{'' if row.dice is None else f'dice {row.dice:.4f}'} "
                 f"{'' if row.peak_mb is None else f'peak {row.peak_mb:.0f} MB'} {row.note}")
        return row

    def reps(self, stage: str) -> tuple[int, int]:
        a = self.args
        if self.device.type == "cpu" and stage == "encoder":
            return a.cpu_encoder_warmup, a.cpu_encoder_repeats
        return a.warmup, a.repeats

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def variants(self, config: ModelConfig):
        """(name, dtype, FastOptions) of the fast-path variants to run."""
        if self.device.type != "cuda":
            return [("plain fp32 calls", torch.float32, FastOptions(rewrites=False)),
                    ("fast path (cpu: rewrites, no graphs)", torch.float32, FastOptions())]
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        out = [("graph (engine default)", half, FastOptions()),
               ("graph, strict fp32", torch.float32, FastOptions()),
               ("no graph (rewrites only)", half, FastOptions(graphs=False)),
               ("graph, no rewrites", half, FastOptions(rewrites=False)),
               ("graph, fp32 decoder without TF32", half, FastOptions(decoder_tf32=False)),
               ("graph, bf16 decoder", half, FastOptions(decoder_dtype=None))]
        for i, mode in enumerate(self.args.compile):
            out.append((f"compile {mode} + graph", half, FastOptions(compile=mode)))
            if self.args.flex and (i == 0 or self.args.all_variants):
                out.append((f"compile {mode} + flex + graph", half, FastOptions(compile=mode, attention="flex")))
        if config.name != "fastsam3d" and not self.args.all_variants:
            # the large encoder: the levers that matter for it
            out = [v for v in out if "decoder" not in v[0] and "max-autotune" not in v[0]]
        return out

    # -- per model --
    def run_model(self, name: str, config: ModelConfig) -> None:
        a, dev = self.args, self.device
        cuda = dev.type == "cuda"
        self.log(f"== {name}: building (random weights, seed {a.seed})")
        model = randomize_(Sam3D(config), a.seed).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        inputs = make_inputs(config, dev, a.input_sets, seed=a.seed + 1)
        s = config.encoder.img_size
        model_dev = model.to(dev)
        do_decoder = name == a.models[0] or a.all_variants

        # fp32 eager, TF32 off: the reference values for every error column
        with torch.inference_mode(), _matmul_flags(False, dev):
            ref_emb = [model_dev.encode(v) for v in inputs.volumes]
            ref_low = [model_dev.decode(e, p.to(dev), l.to(dev), m)[0]
                       for e, p, l, m in zip(ref_emb, inputs.points, inputs.labels, inputs.masks)]
        ref_masks = [upsampled_mask(x, s) for x in ref_low]

        def eager_encode(volume):
            with torch.inference_mode():
                return model_dev.encode(volume)

        def eager_click(emb, p, l, m, up=True):
            with torch.inference_mode():
                low, _ = model_dev.decode(emb, p.to(dev), l.to(dev), m)
                return upsampled_mask(low, s) if up else low

        enc_args = [(v,) for v in inputs.volumes]
        dec_args = [(e, p, l, m) for e, p, l, m in zip(ref_emb, inputs.points, inputs.labels, inputs.masks)]
        w, r = self.reps("encoder")
        mem: dict = {}
        with peak_memory(dev, mem):
            eager_encode(inputs.volumes[0])
            eager_click(*dec_args[0])
        eager_enc = self.add(Row(name, "encoder", "eager (our model)", "fp32", peak_mb=mem.get("peak_mb")),
                             time_calls(eager_encode, enc_args, dev, w, r))
        eager_rows = {"encoder": eager_enc}
        if do_decoder:
            w, r = self.reps("decoder")
            eager_rows["decoder"] = self.add(Row(name, "decoder", "eager (our model)", "fp32"),
                                             time_calls(partial(eager_click, up=False), dec_args, dev, w, r))
            eager_rows["decoder+up128"] = self.add(Row(name, "decoder+up128", "eager (our model)", "fp32"),
                                                   time_calls(eager_click, dec_args, dev, w, r))
        if cuda:
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

            def autocast_encode(volume):
                with torch.inference_mode(), torch.autocast("cuda", dtype=half):
                    return model_dev.encode(volume)

            def autocast_click(emb, p, l, m, up=True):
                with torch.inference_mode(), torch.autocast("cuda", dtype=half):
                    low, _ = model_dev.decode(emb, p.to(dev), l.to(dev), m)
                return upsampled_mask(low, s) if up else low

            with torch.inference_mode():
                embs = [autocast_encode(v) for v in inputs.volumes]
                lows = [autocast_click(e, p, l, m, up=False) for e, p, l, m in
                        zip(embs, inputs.points, inputs.labels, inputs.masks)]
            err = max(rel_max(x, y) for x, y in zip(embs, ref_emb))
            w, r = self.reps("encoder")
            self.add(Row(name, "encoder", "eager autocast", "bf16", err=err,
                         err_l2=max(rel_l2(x, y) for x, y in zip(embs, ref_emb))),
                     time_calls(autocast_encode, enc_args, dev, w, r))
            if do_decoder:
                w, r = self.reps("decoder")
                d = min(dice(upsampled_mask(x, s), y) for x, y in zip(lows, ref_masks))
                e2 = max(rel_max(x, y) for x, y in zip(lows, ref_low))
                self.add(Row(name, "decoder+up128", "eager autocast", "bf16", err=e2, dice=d),
                         time_calls(autocast_click, [(e, p, l, m) for e, p, l, m in
                                                     zip(embs, inputs.points, inputs.labels, inputs.masks)],
                                    dev, w, r))

        # reference implementation, same weights
        ref_rows = {}
        if self.reference_root is not None:
            try:
                ref_rows = self.run_reference(name, config, state, inputs, ref_emb, ref_low, ref_masks,
                                              do_decoder)
            except Exception as exc:          # the user's copy may differ: report, go on
                self.log(f"reference failed: {type(exc).__name__}: {exc}")
                self.checks[f"{name} reference"] = f"failed: {exc}"

        self.ctx[name] = dict(config=config, model=model, inputs=inputs, ref_emb=ref_emb, ref_low=ref_low,
                              ref_masks=ref_masks, do_decoder=do_decoder, eager_rows=eager_rows,
                              ref_rows=ref_rows)

    def run_variants(self, name: str, compiled: bool) -> None:
        c = self.ctx[name]
        for vname, dtype, options in self.variants(c["config"]):
            if bool(options.compile) != compiled:
                continue
            if self.over_budget():
                self.log(f"time budget spent: skipping {name} {vname}")
                continue
            try:
                self.run_fast_variant(name, c["config"], c["model"], vname, dtype, options, c["inputs"],
                                      c["ref_emb"], c["ref_low"], c["ref_masks"], c["do_decoder"])
            except Exception as exc:
                self.log(f"{name} {vname} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                self.checks[f"{name} {vname}"] = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def finalize(self) -> None:
        for row in self.rows:
            c = self.ctx.get(row.model)
            if c is None or row.ms is None:
                continue
            ref = c["ref_rows"].get(row.stage)
            if ref is not None and ref.ms and not row.variant.startswith("reference"):
                row.vs_ref = ref.ms / row.ms
            eager = c["eager_rows"].get(row.stage)
            if eager is not None and eager.ms:
                row.vs_eager = eager.ms / row.ms

    def run_reference(self, name, config, state, inputs, ref_emb, ref_low, ref_masks, do_decoder) -> dict:
        dev = self.device
        ref = Reference(self.reference_root, config, state, dev)
        with torch.inference_mode():
            embs = [ref.encode(v) for v in inputs.volumes]
            lows = [ref.decode(e, p.to(dev), l.to(dev), m)[0]
                    for e, p, l, m in zip(ref_emb, inputs.points, inputs.labels, inputs.masks)]
        # Our fp32 model against the reference with the same weights: the parity check.
        self.checks[f"{name} ours vs reference (fp32, rel max)"] = {
            "embedding": max(rel_max(x, y) for x, y in zip(ref_emb, embs)),
            "low_res_logits": max(rel_max(x, y) for x, y in zip(ref_low, lows))}
        self.log(f"parity ours vs reference: {self.checks[f'{name} ours vs reference (fp32, rel max)']}")

        def encode(volume):
            with torch.inference_mode():
                return ref.encode(volume)

        def click(e, p, l, m, up=True):
            with torch.inference_mode():
                return ref.click(e, p.to(dev), l.to(dev), m) if up else ref.decode(e, p.to(dev), l.to(dev), m)[0]

        rows = {}
        w, r = self.reps("encoder")
        rows["encoder"] = self.add(Row(name, "encoder", "reference eager", "fp32"),
                                   time_calls(encode, [(v,) for v in inputs.volumes], dev, w, r))
        if dev.type == "cuda":
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

            def encode_half(volume):
                with torch.inference_mode(), torch.autocast("cuda", dtype=half):
                    return ref.encode(volume)
            self.add(Row(name, "encoder", "reference eager autocast", "bf16"),
                     time_calls(encode_half, [(v,) for v in inputs.volumes], dev, w, r))
        if do_decoder:
            dec_args = [(e, p, l, m) for e, p, l, m in zip(ref_emb, inputs.points, inputs.labels, inputs.masks)]
            w, r = self.reps("decoder")
            rows["decoder"] = self.add(Row(name, "decoder", "reference eager", "fp32"),
                                       time_calls(partial(click, up=False), dec_args, dev, w, r))
            rows["decoder+up128"] = self.add(Row(name, "decoder+up128", "reference eager", "fp32"),
                                             time_calls(click, dec_args, dev, w, r))
            # Our fast decoder and the mask it feeds are compared with the reference's upsampled click.
            rows["click-to-mask"] = rows["decoder+up128"]
        del ref
        return rows

    def run_fast_variant(self, name, config, model, vname, dtype, options, inputs, ref_emb, ref_low,
                         ref_masks, do_decoder) -> None:
        dev = self.device
        s = config.encoder.img_size
        prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        mem: dict = {}
        model_host = model.to("cpu")             # the fast path makes its own device copies
        with peak_memory(dev, mem):
            t0 = time.perf_counter()
            fast = FastPath(model_host, dev, dtype, options)
            if fast.graphs_enabled:
                fast.warm_up(max_points=1)
            else:
                fast.encode(inputs.volumes[0])
                fast.decode(ref_emb[0], inputs.points[0], inputs.labels[0], inputs.masks[0])
            _sync(dev)
            setup = time.perf_counter() - t0
            embs = [fast.encode(v) for v in inputs.volumes]
            outs = [fast.decode(e, p, l, m) for e, p, l, m in zip(embs, inputs.points, inputs.labels, inputs.masks)]
            # the decoder alone, on the fp32 embeddings: its own error
            outs_own = [fast.decode(e, p, l, m)[0] for e, p, l, m in
                        zip(ref_emb, inputs.points, inputs.labels, inputs.masks)]
            _sync(dev)
        emb_err = max(rel_max(x, y) for x, y in zip(embs, ref_emb))
        emb_l2 = max(rel_l2(x, y) for x, y in zip(embs, ref_emb))
        low_err = max(rel_max(x[0], y) for x, y in zip(outs, ref_low))
        dec_err = max(rel_max(x, y) for x, y in zip(outs_own, ref_low))
        d = min(dice(upsampled_mask(x[0], s), y) for x, y in zip(outs, ref_masks))
        w, r = self.reps("encoder")
        self.add(Row(name, "encoder", vname, prec, err=emb_err, err_l2=emb_l2, peak_mb=mem.get("peak_mb"),
                     setup_s=setup), time_calls(fast.encode, [(v,) for v in inputs.volumes], dev, w, r))
        if do_decoder:
            w, r = self.reps("decoder")
            host_args = [(e, p, l, m) for e, p, l, m in zip(embs, inputs.points, inputs.labels, inputs.masks)]
            self.add(Row(name, "decoder", vname, prec, err=dec_err, dice=d,
                         err_l2=max(rel_l2(x, y) for x, y in zip(outs_own, ref_low)),
                         note=f"end-to-end logits err {low_err:.1e}"),
                     time_calls(fast.decode, host_args, dev, w, r))

            ups = [fast.decode_upsampled(e, p, l, m)[2] for e, p, l, m in host_args]
            d_up = min(dice(x, y) for x, y in zip(ups, ref_masks))
            self.add(Row(name, "decoder+up128", vname, prec, err=low_err, dice=d_up,
                         err_l2=max(rel_l2(x[0], y) for x, y in zip(outs, ref_low)),
                         note="upsample + threshold inside the graph" if fast.graphs_enabled else ""),
                     time_calls(fast.decode_upsampled, host_args, dev, w, r))
        self.checks[f"{name} {vname} {prec} capture_s"] = dict(fast.stats.capture_s)
        fast.release()
        del fast
        model.to(dev)

    # -- the engine: click-to-mask on a CT-sized image --
    def run_engine(self, name: str, config: ModelConfig) -> None:
        from . import session as session_module
        from .acceleration import logits_to_patch_fast
        from .image import image_from_array, lps_to_ras
        a, dev = self.args, self.device
        cuda = dev.type == "cuda"
        shape_kji = tuple(a.image_shape)
        self.log(f"== engine: {name} on a {shape_kji[::-1]} (i, j, k) image, spacing {a.image_spacing}")
        gen = torch.Generator().manual_seed(a.seed + 7)
        coarse = torch.rand(1, 1, 12, 16, 16, generator=gen) * 800 - 300
        image_arr = F.interpolate(coarse, size=shape_kji, mode="trilinear", align_corners=False)[0, 0]
        image_arr = (image_arr + 20 * torch.randn(shape_kji, generator=gen)).numpy().astype(np.float32)
        image = image_from_array(image_arr, spacing=tuple(a.image_spacing))
        del image_arr
        model = randomize_(Sam3D(config), a.seed).eval()
        full = np.zeros(shape_kji, dtype=bool)          # the caller's label grid in host memory

        # click points (RAS) around the image centre, inside one ROI
        size_kji = np.array(shape_kji)
        centre_ijk = (size_kji[::-1] - 1) / 2.0

        def ras(offset_mm):
            ijk = centre_ijk + np.asarray(offset_mm) / np.asarray(a.image_spacing)
            lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
            return lps_to_ras(lps)

        offsets = [(0, 0, 0), (6, -4, 3), (-5, 5, -2), (3, 7, 4), (-7, -3, 1)]
        # points a third of the image apart in-plane: each needs its own ROI (re-embed)
        ext = np.asarray(a.image_spacing) * size_kji[::-1] / 3
        far = [(sx * ext[0], sy * ext[1], 0.0) for sx, sy in ((1, 1), (-1, 1), (1, -1), (-1, -1))]
        g = 4 * config.image_embedding_size
        cells = (torch.arange(g, dtype=torch.float32) + 0.5) * (config.encoder.img_size / g) - 0.5
        zz, yy, xx = torch.meshgrid(cells, cells, cells, indexing="ij")
        centre = (config.encoder.img_size - 1) / 2
        sphere = (30.0 - torch.sqrt((zz - centre) ** 2 + (yy - centre) ** 2 + (xx - centre) ** 2)
                  * config.spacing_mm)[None, None].to(dev)
        plain = "engine, plain calls" + (" (autocast)" if cuda else "")
        session_paste = ("grid_sample paste", MaskPaster("grid_sample", pinned=False))
        fast_paste = ("fast paste", logits_to_patch_fast)
        combos = [(plain, "off", False, session_paste), ("engine, fast path", "auto", False, session_paste),
                  ("engine, fast path", "auto", False, fast_paste),
                  (plain + ", 30 mm sphere logits", "off", True, session_paste),
                  ("engine, fast path, 30 mm sphere logits", "auto", True, session_paste),
                  ("engine, fast path, 30 mm sphere logits", "auto", True, fast_paste)]
        for vname, fast, use_sphere, (paste_name, paste_fn) in combos:
            if True:
                if self.over_budget():
                    self.log("time budget spent: skipping engine variants")
                    return
                mem: dict = {}
                original = session_module.logits_to_patch_fast
                # the session's paste-back with its default kernels, or with grid_sample only
                session_module.logits_to_patch_fast = paste_fn
                try:
                    with peak_memory(dev, mem):
                        engine = session_module.Engine(model=model, device=str(dev), fast=fast)
                        if use_sphere:
                            # A compact object, as trained weights give (random weights fill the ROI):
                            # the real decoder runs, its logits are replaced by a 30 mm sphere's.
                            real_decode = engine.decode

                            def sphere_decode(*args, _real=real_decode, **kwargs):
                                logits, iou = _real(*args, **kwargs)
                                return sphere.to(logits.device).clone(), iou
                            engine.decode = sphere_decode
                        t0 = time.perf_counter()
                        engine.new_session(image).add_click(ras(offsets[0]))
                        first_s = time.perf_counter() - t0
                        # second ROI region: re-embed (ROI extraction + encoder) timed after warm-up
                        reembed = []
                        for k in range(a.engine_reembeds):
                            t0 = time.perf_counter()
                            res = engine.new_session(image).add_click(ras(far[k % len(far)]))
                            reembed.append((time.perf_counter() - t0) * 1e3)
                            full[res.patch.slices] = res.patch.array
                        # clicks with the ROI embedding cached: new object, 1 point, zero mask prompt
                        one, two, boxes = [], [], []
                        for k in range(a.engine_clicks + 2):
                            session = engine.new_session(image)
                            t0 = time.perf_counter()
                            res = session.add_click(ras(offsets[k % len(offsets)]))
                            full[res.patch.slices] = res.patch.array
                            t1 = time.perf_counter()
                            res2 = session.add_click(ras(offsets[(k + 1) % len(offsets)]),
                                                     positive=bool(k % 2))
                            full[res2.patch.slices] = res2.patch.array
                            t2 = time.perf_counter()
                            if k >= 2:                       # warm-up: graphs for 1 and 2 points
                                one.append((t1 - t0) * 1e3)
                                two.append((t2 - t1) * 1e3)
                                boxes.append(int(res.patch.array.size))
                        _sync(dev)
                finally:
                    session_module.logits_to_patch_fast = original
                timing = lambda x: {"ms": float(np.median(x)), "p10": float(np.percentile(x, 10)),  # noqa: E731
                                    "p90": float(np.percentile(x, 90)), "wall_ms": float(np.median(x)),
                                    "n": len(x)}
                prec = "fp32" if not cuda else ("bf16" if fast != "off" else "bf16 ac")
                label = f"{vname}, {paste_name}"
                note = (f"patch {int(np.median(boxes))} voxels; first click of the engine "
                        f"{first_s * 1e3:.0f} ms")
                self.add(Row(name, "click-to-mask", label, prec, peak_mb=mem.get("peak_mb"), note=note),
                         timing(one))
                self.add(Row(name, "click-to-mask 2", label, prec, note="2nd click: 2 points + mask prompt"),
                         timing(two))
                if reembed:
                    self.add(Row(name, "click+re-embed", label, prec,
                                 note="new region: ROI resampling + encoder + click"), timing(reembed))
                del engine
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

    def run_paste(self, name: str, config: ModelConfig) -> None:
        """The paste-back alone for a 60 mm sphere and for a mask filling the ROI."""
        from .roi import RoiGeometry, logits_to_patch, positive_box_on_image
        a, dev = self.args, self.device
        shape_kji = tuple(a.image_shape)
        # Geometry only: an image header of the full size (the paste never reads voxels).
        import SimpleITK as sitk
        header = sitk.Image([int(v) for v in shape_kji[::-1]], sitk.sitkUInt8)
        header.SetSpacing(tuple(float(v) for v in a.image_spacing))
        centre = np.asarray(header.TransformContinuousIndexToPhysicalPoint(
            ((np.array(shape_kji[::-1]) - 1) / 2).tolist()))
        roi = RoiGeometry(tuple(centre), config.encoder.img_size, config.spacing_mm)
        g = 4 * config.image_embedding_size
        cells = (torch.arange(g, dtype=torch.float32) + 0.5) * (roi.size / g) - 0.5
        zz, yy, xx = torch.meshgrid(cells, cells, cells, indexing="ij")
        r = torch.sqrt((zz - (roi.size - 1) / 2) ** 2 + (yy - (roi.size - 1) / 2) ** 2
                       + (xx - (roi.size - 1) / 2) ** 2) * roi.spacing
        objects = {"sphere r=30mm": (30.0 - r), "whole ROI": torch.ones(g, g, g)}
        def session_paste(img, rr, lg):                 # what add_click does
            box = positive_box_on_image(img, rr, lg)
            return logits_to_patch(img, rr, lg, box)
        targets = [("roi: positive box + logits_to_patch", session_paste),
                   ("sub-box, grid_sample", MaskPaster("grid_sample", pinned=False)),
                   ("sub-box, separable", MaskPaster("separable", pinned=False))]
        if dev.type == "cuda":
            targets += [("sub-box, separable, pinned", MaskPaster("separable", pinned=True)),
                        ("sub-box, triton", MaskPaster("triton", pinned=False)),
                        ("sub-box, triton, pinned", MaskPaster("triton", pinned=True))]
        for oname, logits in objects.items():
            logits = logits.to(dev)
            reference = session_paste(header, roi, logits)
            full_ref = np.zeros(shape_kji, bool)
            reference.paste_into(full_ref)
            for tname, fn in targets:
                if self.over_budget():
                    return
                try:
                    patch = fn(header, roi, logits)
                    full = np.zeros(shape_kji, bool)
                    patch.paste_into(full)
                    mismatch = int((full != full_ref).sum())
                    timing = time_calls(lambda: fn(header, roi, logits).paste_into(full), [()], dev,
                                        2, max(5, a.repeats // 5))
                    timing["ms"] = timing["wall_ms"]             # host result: wall clock
                    self.add(Row(name, "paste-back", f"{oname}: {tname}", "fp32",
                                 note=f"{patch.array.size} voxels, {mismatch} differ from roi"), timing)
                except Exception as exc:
                    self.log(f"paste {tname} failed: {type(exc).__name__}: {exc}")
                    self.checks[f"paste {oname} {tname}"] = f"failed: {exc}"

    def profile(self, name: str) -> None:
        """Top CUDA kernels of the fast path's uncaptured bf16 encoder and decoder."""
        if self.device.type != "cuda":
            return
        from torch.profiler import ProfilerActivity, profile
        c = self.ctx[name]
        fast = FastPath(c["model"].to("cpu"), self.device, torch.bfloat16, FastOptions(graphs=False))
        v, e = c["inputs"].volumes[0], c["ref_emb"][0]
        p, l, m = c["inputs"].points[0], c["inputs"].labels[0], c["inputs"].masks[0]
        for what, fn in (("encoder", lambda: fast.encode(v)), ("decoder", lambda: fast.decode(e, p, l, m))):
            for _ in range(3):
                fn()
            _sync(self.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                _sync(self.device)
            events = [k for k in prof.key_averages() if k.device_type.name == "CUDA"]
            total = sum(k.self_device_time_total for k in events)
            count = sum(k.count for k in events)
            self.log(f"profile {name} {what}: {count} kernels, {total / 1e3:.3f} ms of kernel time")
            lines = sorted(events, key=lambda k: -k.self_device_time_total)[:15]
            self.checks[f"profile {name} {what}"] = {
                "kernels": count, "kernel_ms": total / 1e3,
                "top": [(k.key[:90], k.count, round(k.self_device_time_total / 1e3, 4)) for k in lines]}
            for k in lines:
                print(f"    {k.self_device_time_total / 1e3:8.4f} ms {k.count:4d}x  {k.key[:110]}")
        c["model"].to(self.device)

    def run(self) -> dict:
        a = self.args
        if self.device.type == "cpu":
            torch.set_num_threads(a.threads)
        elif a.threads:
            torch.set_num_threads(a.threads)
        env = environment(self.device)
        self.log(f"device {env['device']}, torch {env['torch']}, threads {env['threads']}")
        configs = {"tiny": TINY, "tiny-windowed": TINY_WINDOWED, **NAMED_CONFIGS}
        for name in a.models:
            self.run_model(name, configs[name])
            self.run_variants(name, compiled=False)
        if a.engine:
            name = a.models[0]
            for what, fn in (("engine", self.run_engine), ("paste", self.run_paste)):
                try:
                    fn(name, configs[name])
                except Exception as exc:
                    self.log(f"{what} failed: {type(exc).__name__}: {exc}")
                    self.checks[what] = f"failed: {type(exc).__name__}: {exc}"
        for name in a.models:
            self.run_variants(name, compiled=True)
        if a.profile:
            self.profile(a.models[0])
        self.finalize()
        return {"environment": env, "arguments": vars(a), "rows": [asdict(r) for r in self.rows],
                "checks": self.checks, "seconds": time.perf_counter() - self.started}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device"] = f"CPU ({torch.get_num_threads()} threads)"
    return env


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"device: {env['device']} | torch {env['torch']}"
             + (f" | CUDA {env.get('cuda')}" if env.get("cuda") else "") + f" | threads {env['threads']}",
             "| model | stage | variant | prec | median ms | p90 | x vs ref fp32 | x vs eager fp32 | "
             "err (rel max) | err (rel L2) | Dice | peak MB | setup s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['stage']} | {r['variant']} | {r['precision']} | {f(r['ms'], '.3f')} | "
                     f"{f(r['p90'], '.3f')} | {f(r['vs_ref'], '.1f')} | {f(r['vs_eager'], '.1f')} | "
                     f"{f(r['err'], '.1e')} | {f(r['err_l2'], '.1e')} | {f(r['dice'], '.4f')} | "
                     f"{f(r['peak_mb'], '.0f')} | "
                     f"{f(r['setup_s'], '.2f')} | {r['note']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m FastSAM3DLib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    p.add_argument("--models", default=None,
                   help="comma-separated: fastsam3d, sam-med3d, fastsam3d-teacher, tiny "
                        "(default: fastsam3d,sam-med3d on CUDA, fastsam3d on the CPU)")
    p.add_argument("--reference", default=None, help="folder holding SAM-Med3D/ and FastSAM3D/ (upstream code)")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cpu-encoder-repeats", type=int, default=5)
    p.add_argument("--cpu-encoder-warmup", type=int, default=1)
    p.add_argument("--input-sets", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on the CPU)")
    p.add_argument("--compile", default="default",
                   help="comma-separated torch.compile modes to try (e.g. default,max-autotune-no-cudagraphs), "
                        "or none")
    p.add_argument("--flex", action="store_true", help="also the FlexAttention variants (compile)")
    p.add_argument("--all-variants", action="store_true", help="every variant for every model")
    p.add_argument("--no-engine", dest="engine", action="store_false", help="skip the Engine click-to-mask")
    p.add_argument("--image-shape", default="300,512,512", help="k,j,i voxels of the synthetic CT")
    p.add_argument("--image-spacing", default="0.75,0.75,1.0", help="i,j,k spacing in mm")
    p.add_argument("--engine-clicks", type=int, default=20)
    p.add_argument("--engine-reembeds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip remaining variants after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the fast path")
    p.add_argument("--tiny", action="store_true",
                   help="CI smoke run: the tiny model, a small image, few repeats, no compile")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    if args.tiny:
        args.models = args.models or "tiny"
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
        args.cpu_encoder_repeats, args.cpu_encoder_warmup = 2, 1
        args.input_sets = min(args.input_sets, 2)
        args.image_shape = "40,64,64"
        args.engine_clicks, args.engine_reembeds = 2, 1
        args.compile = "none"
    args.models = (args.models or ("fastsam3d,sam-med3d" if cuda else "fastsam3d")).split(",")
    args.compile = [] if args.compile in ("none", "") else args.compile.split(",")
    if args.threads is None and not cuda:
        args.threads = 2
    args.image_shape = [int(v) for v in str(args.image_shape).split(",")]
    args.image_spacing = [float(v) for v in str(args.image_spacing).split(",")]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    result = Bench(args).run()
    table = format_table(result)
    if result["checks"]:
        print("checks:", json.dumps(result["checks"], indent=1, default=str))
    print(table)
    result["table"] = table
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
