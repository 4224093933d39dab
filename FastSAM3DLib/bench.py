"""Speed benchmark: ``python -m FastSAM3DLib.bench --out DIR``.

Times the library as users run it, without patching it: the model's
``encode`` / ``decode`` through ``ModelRunner`` in each variant (precision,
CUDA graphs, torch.compile), one decoder click with the reference pipelines'
128^3 upsample, click-to-mask through the ``Engine`` on a CT-sized image (its
``paster`` injection point pastes a 30 mm sphere so the paste-back has a
realistic size with random weights), and the paste-back alone. Every variant's
outputs are compared with the float32 eager model on the same inputs: logits
error (max |x - ref| / max |ref|) and the Dice of the 128^3 masks. With
``--reference DIR`` (local copies DIR/SAM-Med3D and DIR/FastSAM3D of the
upstream code, never shipped) the upstream modules are timed with the same
weights.

Weights are random (seeded, every parameter non-zero) except for ``default``
(the bundled weights). GPU times: CUDA events around each synchronised call;
CPU: wall clock; medians after warm-up, inputs rotated over three sets.
The Engine and paste-back stages need SimpleITK; without it they are skipped
and the reason is recorded. Writes DIR/bench.json and DIR/bench.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
import types
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .acceleration import ModelRunner
from .model import NAMED_CONFIGS, EncoderConfig, ModelConfig, Sam3D
from .training.losses import batch_dice

TINY = ModelConfig(name="tiny", encoder=EncoderConfig(
    img_size=64, embed_dim=48, depth=3, num_heads=2, window_size=0, global_attn_indexes=(),
    attention_free_blocks=1, block_formula="fastsam3d"))
HALF = torch.bfloat16


@dataclass(frozen=True)
class Variant:
    name: str
    precision: torch.dtype = torch.float32          # the encoder's autocast dtype
    decoder_precision: torch.dtype = torch.float32
    graphs: bool = False
    compile: bool = False
    tf32: bool = False

    def runner(self, model: Sam3D, device: torch.device) -> ModelRunner:
        return ModelRunner(model, device, self.precision, self.decoder_precision, graphs=self.graphs,
                           compile=self.compile, tf32=self.tf32)


EAGER_FP32 = Variant("eager fp32")
CUDA_VARIANTS = (
    EAGER_FP32,
    Variant("eager, bf16 encoder", HALF),
    Variant("graphs, fp32", graphs=True),
    Variant("graphs, bf16 encoder, fp32/TF32 decoder (engine default)", HALF, graphs=True, tf32=True),
    Variant("graphs, bf16 encoder, bf16 decoder", HALF, HALF, graphs=True),
)
COMPILED_VARIANTS = (
    Variant("compile + graphs, bf16 encoder, fp32/TF32 decoder", HALF, graphs=True, compile=True, tf32=True),
    Variant("compile + graphs, bf16 encoder, bf16 decoder", HALF, HALF, graphs=True, compile=True),
)


@dataclass
class Row:
    model: str
    stage: str
    variant: str
    ms: float | None = None
    p90: float | None = None
    err: float | None = None          # max |x - fp32 eager| / max |fp32 eager|
    dice: float | None = None         # 128^3 masks against fp32 eager
    peak_mb: float | None = None      # GPU memory of the variant: weights, graphs, buffers
    note: str = ""


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights of realistic scales, none zero (relative and absolute
    positions included, so every term of the model is exercised)."""
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
        for b in model.buffers():                      # the prompt encoder's Fourier matrix
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen))
    return model


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def upsampled_mask(logits: torch.Tensor, size: int) -> torch.Tensor:
    """The reference pipelines' prediction: trilinear upsample to the crop, > 0."""
    return F.interpolate(logits.float(), size=(size,) * 3, mode="trilinear", align_corners=False) > 0


def measure(fn, inputs: list, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, p90) ms of ``fn(*inputs[i])``, rotating the input sets."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - started) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def sphere_logits(size: int, low: int, radius_vox: float) -> torch.Tensor:
    """(low,)^3 logits of a ball of ``radius_vox`` ROI voxels at the ROI centre."""
    cells = (torch.arange(low, dtype=torch.float32) + 0.5) * (size / low) - 0.5 - (size - 1) / 2
    z, y, x = torch.meshgrid(cells, cells, cells, indexing="ij")
    return radius_vox - torch.sqrt(z ** 2 + y ** 2 + x ** 2)


class Reference:
    """The upstream modules (from the user's local copy) holding our weights."""

    def __init__(self, root: Path, config: ModelConfig, model: Sam3D, device):
        def modeling(alias, repo):
            folder = next((c for c in (root / repo / "segment_anything" / "modeling", root / repo / "modeling")
                           if (c / "image_encoder3D.py").exists()), None)
            if folder is None:
                raise FileNotFoundError(f"no {repo}/segment_anything/modeling/image_encoder3D.py under {root}")
            package = types.ModuleType(alias)            # its __init__ pulls in unrelated 2D code
            package.__path__ = [str(folder)]
            sys.modules[alias] = package
            return lambda name: importlib.import_module(f"{alias}.{name}")

        sam = modeling("bench_ref_sammed3d", "SAM-Med3D")
        e = config.encoder
        common = dict(img_size=e.img_size, patch_size=e.patch_size, mlp_ratio=e.mlp_ratio, qkv_bias=True,
                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=e.use_rel_pos,
                      out_chans=e.out_chans, embed_dim=e.embed_dim, depth=e.depth, num_heads=e.num_heads)
        self.list_output = config.name == "fastsam3d"
        if config.name == "fastsam3d":
            self.encoder = modeling("bench_ref_fastsam3d", "FastSAM3D")("image_encoder3D").ImageEncoderViT3D(
                global_attn_indexes=[2, 5, 8, 11], window_size=0, skip_layer=e.attention_free_blocks, **common)
        elif config.name == "sam-med3d":
            self.encoder = sam("image_encoder3D").ImageEncoderViT3D(
                global_attn_indexes=list(e.global_attn_indexes), window_size=e.window_size, **common)
        else:
            raise ValueError(f"no reference for configuration {config.name}")
        g = config.image_embedding_size
        self.prompt_encoder = sam("prompt_encoder3D").PromptEncoder3D(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(g, g, g),
            input_image_size=(e.img_size,) * 3, mask_in_chans=config.mask_in_chans)
        self.mask_decoder = sam("mask_decoder3D").MaskDecoder3D(
            num_multimask_outputs=3, transformer_dim=config.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=256)
        state = model.state_dict()
        for prefix, module in (("image_encoder.", self.encoder), ("prompt_encoder.", self.prompt_encoder),
                               ("mask_decoder.", self.mask_decoder)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            module.eval().to(device)

    @torch.inference_mode()
    def encode(self, volume):
        out = self.encoder(volume)
        return out[-1] if self.list_output else out

    @torch.inference_mode()
    def decode(self, embedding, points, labels, mask):
        sparse, dense = self.prompt_encoder(points=[points, labels], boxes=None, masks=mask)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.rows: list[Row] = []
        self.skipped: dict[str, str] = {}
        self.models: dict[str, Sam3D] = {}
        self.truth: dict[str, dict] = {}
        self.started = time.perf_counter()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.started:6.1f}s] {row.model} | {row.stage} | {row.variant} | "
              f"{row.ms if row.ms is None else round(row.ms, 3)} ms | err {row.err} | dice {row.dice} "
              f"{row.note}", flush=True)

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started > self.args.budget_s:
            self.skipped[what] = f"over the {self.args.budget_s:.0f} s budget"
            return True
        return False

    def model(self, name: str) -> Sam3D:
        if name == "default":
            from .build import build_model
            return build_model("default", device="cpu")
        return randomize_(Sam3D(TINY if name == "tiny" else NAMED_CONFIGS[name]), self.args.seed)

    def inputs(self, config: ModelConfig, n_points: int) -> list[tuple]:
        gen = torch.Generator().manual_seed(self.args.seed + n_points)
        s, low = config.encoder.img_size, 4 * config.image_embedding_size
        return [(torch.randn(1, 1, s, s, s, generator=gen).to(self.device),
                 (torch.rand(1, n_points, 3, generator=gen) * 0.7 * s + 0.15 * s).to(self.device),
                 torch.ones(1, n_points, dtype=torch.int64, device=self.device),
                 (2 * torch.randn(1, 1, low, low, low, generator=gen)).to(self.device)) for _ in range(3)]

    def run_model(self, name: str, variants) -> None:
        """Times ``variants`` (the first call for a model must include EAGER_FP32:
        the reference every later variant is compared with)."""
        a, dev = self.args, self.device
        if name not in self.models:
            self.models[name] = self.model(name).eval().to(dev)
        model = self.models[name]
        sets = {n: self.inputs(model.config, n) for n in (1, 4)}
        truth = self.truth.setdefault(name, {})
        for variant in variants:
            if self.over_budget(f"{name} {variant.name}"):
                continue
            try:
                self.run_variant(name, model, variant, sets, truth)
            except Exception as exc:              # one failing variant must not lose the others' rows
                self.skipped[f"{name} {variant.name}"] = f"failed: {type(exc).__name__}: {exc}"
                print(f"{name} {variant.name} failed: {type(exc).__name__}: {exc}", flush=True)
        if a.reference and "reference" not in truth:
            truth["reference"] = True
            self.run_reference(name, model, sets[1], truth)

    def run_variant(self, name: str, model: Sam3D, variant: Variant, sets: dict, truth: dict) -> None:
        a, dev = self.args, self.device
        size = model.config.encoder.img_size
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        runner = variant.runner(model, dev)
        try:
            embeddings = [runner.encode(v) for v, *_ in sets[1]]
            if variant == EAGER_FP32:
                truth["embedding"] = embeddings
            reps = (a.cpu_encoder_repeats, 1) if dev.type == "cpu" else (a.repeats, a.warmup)
            ms, p90 = measure(lambda v, *_: runner.encode(v), sets[1], dev, reps[1], reps[0])
            encoder_row = Row(name, "encoder", variant.name, ms, p90,
                              rel_max(embeddings[0], truth["embedding"][0]), note=runner.describe())
            self.add(encoder_row)
            for n in (1, 4):
                args = [(truth["embedding"][i], p, lab, m) for i, (_, p, lab, m) in enumerate(sets[n])]
                logits = runner.decode(*args[0])[0]
                if variant == EAGER_FP32:
                    truth[n] = logits
                ms, p90 = measure(runner.decode, args, dev, a.warmup, a.repeats)
                self.add(Row(name, f"decoder, {n} point{'s' * (n > 1)}", variant.name, ms, p90,
                             rel_max(logits, truth[n]),
                             float(batch_dice(upsampled_mask(logits, size), upsampled_mask(truth[n], size)))))
            ms, p90 = measure(lambda *x: upsampled_mask(runner.decode(*x)[0], size),
                              [(truth["embedding"][i], p, lab, m) for i, (_, p, lab, m) in enumerate(sets[1])],
                              dev, a.warmup, a.repeats)
            self.add(Row(name, "decoder + 128^3 upsample", variant.name, ms, p90))
            if dev.type == "cuda":
                encoder_row.peak_mb = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        finally:
            runner.release()

    def run_reference(self, name: str, model: Sam3D, sets: list, truth: dict) -> None:
        try:
            ref = Reference(Path(self.args.reference), model.config, model, self.device)
        except (FileNotFoundError, ImportError, ValueError) as exc:
            self.skipped[f"{name} reference"] = f"{type(exc).__name__}: {exc}"
            return
        a, dev = self.args, self.device
        reps = (a.cpu_encoder_repeats, 1) if dev.type == "cpu" else (a.repeats, a.warmup)
        ms, p90 = measure(lambda v, *_: ref.encode(v), sets, dev, reps[1], reps[0])
        self.add(Row(name, "encoder", "reference fp32", ms, p90, rel_max(ref.encode(sets[0][0]),
                                                                         truth["embedding"][0])))
        args = [(truth["embedding"][i], p, lab, m) for i, (_, p, lab, m) in enumerate(sets)]
        ms, p90 = measure(ref.decode, args, dev, a.warmup, a.repeats)
        self.add(Row(name, "decoder, 1 point", "reference fp32", ms, p90, rel_max(ref.decode(*args[0])[0],
                                                                                 truth[1])))

    def run_engine(self) -> None:
        """Click-to-mask through the Engine, and the paste-back alone (SimpleITK),
        for the first model."""
        name = self.args.models[0]
        model = self.models[name]
        try:
            import SimpleITK as sitk

            from .roi import RoiGeometry, logits_to_patch, positive_box_on_image
            from .session import Engine
        except ImportError as exc:
            self.skipped["engine and paste-back"] = f"needs SimpleITK ({exc})"
            return
        a, dev = self.args, self.device
        shape_kji = a.image_shape
        image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=shape_kji).astype(np.float32))
        image.SetSpacing(a.image_spacing)
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in shape_kji[::-1]]))
        config = model.config
        sphere = sphere_logits(config.encoder.img_size, 4 * config.image_embedding_size, 30.0 / config.spacing_mm)

        def paste(img, roi, logits):               # what a click does after the decoder
            return logits_to_patch(img, roi, logits, positive_box_on_image(img, roi, logits))

        def sphere_paster(img, roi, logits, box):  # a realistic object size despite random weights
            return paste(img, roi, sphere.to(logits.device))

        for precision in ("fp32", "bf16") if dev.type == "cuda" else ("fp32",):
            engine = Engine(model, device=str(dev), precision=precision, paster=sphere_paster)
            label = f"Engine, {engine.runner.describe()}"
            engine.new_session(image).add_click(centre, space="lps")          # embeds the ROI

            def click(n):
                session = engine.new_session(image)
                for k in range(n):
                    session.add_click(centre + [3.0 * k, 0, 0], space="lps", positive=k % 2 == 0)
            for n in (1, 2):
                ms, p90 = measure(lambda: click(n), [()], dev, a.warmup, max(3, a.repeats // 5))
                self.add(Row(name, f"click-to-mask ({n} click{'s' * (n > 1)})", label, ms, p90,
                             note=f"{shape_kji[::-1]} image, 30 mm object, host mask"))
            engine.runner.release()
        roi = RoiGeometry(tuple(centre), config.encoder.img_size, config.spacing_mm)
        oblique = sitk.Image(image)
        c, s = np.cos(0.3), np.sin(0.3)
        oblique.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
        for label, img in (("aligned image", image), ("oblique image", oblique)):
            logits = sphere.to(dev)
            ms, p90 = measure(lambda: paste(img, roi, logits), [()], dev, 2, max(3, a.repeats // 5))
            self.add(Row(name, "paste-back", f"{label}, 30 mm object", ms, p90,
                         note=f"{paste(img, roi, logits).array.size} voxels"))

    def run_cases(self) -> None:
        """The accuracy rule on real cases with the bundled model: per label a
        first click at the target's deepest voxel and one corrective click from
        the float32 eager Engine's mask, given to an Engine per configuration;
        Dice of each mask against the float32 eager Engine's (1.0 when both are
        empty; needs SimpleITK)."""
        a, dev = self.args, self.device
        try:
            from .build import build_model
            from .clicks import center_click
            from .evaluate import load_label
            from .image import load_image
            from .session import Engine
            from .training.data import read_manifest
        except ImportError as exc:
            self.skipped["real cases"] = f"needs SimpleITK and scipy ({exc})"
            return
        names = a.case_names.split(",") if a.case_names else None
        cases = [c for c in read_manifest(a.cases) if names is None or c.name in names]
        model = build_model("default", device=dev)
        configs = [("eager fp32", dict(precision="fp32", graphs=False))]
        if dev.type == "cuda":
            configs += [("graphs fp32", dict(precision="fp32")), ("graphs bf16 (engine default)", dict(precision="bf16"))]
        engines = [(label, Engine(model, device=str(dev), **options)) for label, options in configs]
        scores = {label: [] for label, _ in engines}
        for case in cases:
            image = load_image(case.image)
            labels = load_label(case.label, image)
            spacing = np.array(image.GetSpacing())[::-1]
            for value in sorted(int(v) for v in np.unique(labels) if v != 0)[:a.labels_per_case]:
                gt = labels == value
                first = center_click(np.zeros_like(gt), gt, spacing)
                reference = engines[0][1].new_session(image)
                reference.add_click(first.index[::-1], positive=first.positive, space="ijk")
                second = center_click(reference.mask(), gt, spacing) or first
                reference.add_click(second.index[::-1], positive=second.positive, space="ijk")
                for label, engine in engines:
                    session = engine.new_session(image)
                    for click in (first, second):
                        session.add_click(click.index[::-1], positive=click.positive, space="ijk")
                    masks = torch.from_numpy(session.mask())[None], torch.from_numpy(reference.mask())[None]
                    scores[label].append(float(batch_dice(*masks)))      # both empty: they agree
        for label, values in scores.items():
            if values:
                self.add(Row("default", "real cases: mask Dice vs fp32 (min)", label, dice=float(min(values)),
                             note=f"{len(values)} targets of {len(cases)} cases, 2 clicks; mean "
                                  f"{float(np.mean(values)):.4f}"))

    def run(self) -> dict:
        torch.set_num_threads(self.args.threads or torch.get_num_threads())
        torch.manual_seed(self.args.seed)
        a = self.args
        variants = CUDA_VARIANTS if self.device.type == "cuda" else (EAGER_FP32,)
        for name in a.models:
            self.run_model(name, variants)
        for stage, wanted, run in (("engine and paste-back", a.engine, self.run_engine),
                                   ("real cases", a.cases, self.run_cases)):
            try:
                if wanted:
                    run()
            except Exception as exc:              # report it; the other rows stay
                self.skipped[stage] = f"failed: {type(exc).__name__}: {exc}"
        if a.compile and self.device.type == "cuda":       # last: the slowest to set up
            self.run_model(a.models[0], COMPILED_VARIANTS)
        return {"environment": environment(self.device), "arguments": vars(self.args),
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped,
                "seconds": round(time.perf_counter() - self.started, 1)}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        env["device"] = f"CPU ({torch.get_num_threads()} threads)"
    return env


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['device']}, torch {env['torch']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
             + f", {env['threads']} threads, {env['date']}", "",
             "| model | stage | variant | median ms | p90 ms | err vs fp32 | Dice vs fp32 | peak MB | note |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['stage']} | {r['variant']} | {f(r['ms'], '.3f')} | {f(r['p90'], '.3f')} "
                     f"| {f(r['err'], '.1e')} | {f(r['dice'], '.4f')} | {f(r['peak_mb'], '.0f')} | {r['note']} |")
    lines += [""] + [f"- skipped {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m FastSAM3DLib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    p.add_argument("--models", default=None, help="comma-separated: fastsam3d, sam-med3d, fastsam3d-teacher, "
                   "default (bundled weights), tiny (default: fastsam3d,sam-med3d on CUDA, fastsam3d on the CPU)")
    p.add_argument("--out", default="bench", help="folder for bench.json and bench.md")
    p.add_argument("--reference", default=None, help="folder holding SAM-Med3D/ and FastSAM3D/ (upstream code)")
    p.add_argument("--compile", action="store_true", help="also the torch.compile variants (first model)")
    p.add_argument("--no-engine", dest="engine", action="store_false", help="skip click-to-mask and paste-back")
    p.add_argument("--cases", default=None, help="a MANIFEST.json of real cases for the accuracy rule")
    p.add_argument("--case-names", default=None, help="comma-separated cases of the manifest (default: all)")
    p.add_argument("--labels-per-case", type=int, default=4)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cpu-encoder-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on the CPU)")
    p.add_argument("--image-shape", default="300,512,512", help="k,j,i voxels of the synthetic CT")
    p.add_argument("--image-spacing", default="0.75,0.75,1.0", help="i,j,k spacing in mm")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CI smoke run: tiny model, small image, few repeats")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    if args.tiny:
        args.models = args.models or "tiny"
        args.repeats, args.warmup, args.cpu_encoder_repeats = 3, 1, 2
        args.image_shape = "40,64,64"
    args.models = (args.models or ("fastsam3d,sam-med3d" if cuda else "fastsam3d")).split(",")
    if args.threads is None and not cuda:
        args.threads = 2
    args.image_shape = [int(v) for v in args.image_shape.split(",")]
    args.image_spacing = [float(v) for v in args.image_spacing.split(",")]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = Bench(args).run()
    table = format_table(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
