"""``fastsam3d``: segment scans from point clicks, evaluate models, benchmark, train."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

# The training time budget (--max-minutes) counts from the start of the command.
_STARTED = time.monotonic()

SPACE_HELP = ("coordinate system of the points: 'ras' = Slicer world coordinates "
              "(Right-Anterior-Superior, mm), 'lps' = DICOM/ITK coordinates (mm), "
              "'ijk' = voxel index (i, j, k) of the image, counted from 0")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# "--point -60,20,-110": argparse takes a value that starts with "-" for an option
# (only plain negative numbers are exempt), so such values are joined to their option.
_POINT_OPTIONS = ("--point", "--negative")
_UNSIGNED = r"(\d+\.?\d*|\.\d+)(e[-+]?\d+)?"
_NEGATIVE_POINT = re.compile(rf"^-{_UNSIGNED}(\s*,\s*[-+]?{_UNSIGNED})*$", re.IGNORECASE)


def _join_negative_points(argv: list[str]) -> list[str]:
    out: list[str] = []
    for token in argv:
        if out and out[-1] in _POINT_OPTIONS and _NEGATIVE_POINT.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _parse_point(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a point: write X,Y,Z (three numbers)") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not a point: write X,Y,Z (three numbers)")
    return values


def _json_point(value) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a point: write [x, y, z]")
    try:
        return _parse_point(",".join(map(str, value)))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


class _ClickAction(argparse.Action):
    """--point and --negative append to one list, keeping the order they were typed."""

    def __call__(self, parser, namespace, value, option_string=None):
        clicks = getattr(namespace, "clicks", None) or []
        clicks.append((value, self.const))
        namespace.clicks = clicks


def _objects_from_args(args) -> list[dict]:
    if args.prompts:
        try:
            spec = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the prompts file {args.prompts}: {exc}") from None
        space = spec.get("space", args.space)
        objects = []
        for n, obj in enumerate(spec.get("objects", []), start=1):
            if "clicks" in obj:     # ordered: [{"point": [x, y, z], "positive": true}, ...]
                clicks = [(_json_point(c.get("point")), bool(c.get("positive", True))) for c in obj["clicks"]]
            else:                   # positives first, then negatives
                clicks = ([(_json_point(p), True) for p in obj.get("points", [])]
                          + [(_json_point(p), False) for p in obj.get("negative", [])])
            if not any(positive for _, positive in clicks):
                raise ValueError(f"object {n} of {args.prompts} has no positive point")
            objects.append({"label": int(obj.get("label", n)), "name": obj.get("name", f"object {n}"),
                            "clicks": clicks, "space": obj.get("space", space)})
        if not objects:
            raise ValueError(f"{args.prompts} lists no objects (expected {{\"objects\": [...]}})")
        return objects
    if not args.clicks or not any(positive for _, positive in args.clicks):
        raise ValueError("give at least one --point (a positive click) or --prompts FILE.json")
    return [{"label": 1, "name": "object", "clicks": args.clicks, "space": args.space}]


def _refuse_random_weights(args) -> None:
    """A named architecture without its weights file segments with random
    weights: meaningless masks. Refused unless asked for."""
    from .model import NAMED_CONFIGS
    if args.model in NAMED_CONFIGS and not args.random_weights:
        raise ValueError(f"--model {args.model} names an architecture, not weights: give its weights file "
                         "(e.g. --model FastSAM3D.pth), or 'default' for the bundled model "
                         "(--random-weights runs it untrained: meaningless masks, for testing only)")
    if args.random_weights:
        warnings.warn("--random-weights: the model is untrained; its masks are meaningless")


def _check_points(image, objects) -> None:
    from .image import ImageError, format_numbers, is_inside, point_to_lps
    for obj in objects:
        for point, _ in obj["clicks"]:
            if not is_inside(image, point_to_lps(image, point, obj["space"])):
                raise ImageError(f"the point {format_numbers(point, 2)} ({obj['space']}) of {obj['name']} "
                                 "lies outside the image")


def cmd_segment(args) -> int:
    """Exit status 0: written; 1: an object came out empty (reported; the file is
    written if any other object has voxels); 2: an error, nothing written."""
    import numpy as np
    import SimpleITK as sitk

    from .image import check_output_path, load_image, write_image_atomic
    from .session import Engine

    objects = _objects_from_args(args)
    check_output_path(args.output)                 # before any work
    _refuse_random_weights(args)
    image = load_image(args.image)
    _log(f"loaded {args.image}: {image.GetSize()} voxels, spacing {tuple(round(s, 3) for s in image.GetSpacing())} mm")
    _check_points(image, objects)
    engine = Engine(model=args.model, device=args.device)
    _log(f"model {engine.model.config.name} on {engine.device_description}")
    labelmap = np.zeros(image.GetSize()[::-1], dtype=np.uint16 if max(o["label"] for o in objects) > 255 else np.uint8)
    empty = []
    for obj in objects:
        session = engine.new_session(image)
        for point, positive in obj["clicks"]:
            result = session.add_click(point, positive=positive, space=obj["space"])
            _log(f"  {obj['name']}: {'+' if positive else '-'} click at {point} -> "
                 f"{result.timings['total'] * 1000:.0f} ms{' (region embedded)' if result.reembedded else ''}")
        mask = session.mask()
        free = mask & (labelmap == 0)              # never overwrite an earlier object
        labelmap[free] = obj["label"]
        _log(f"  {obj['name']}: label {obj['label']}, {int(free.sum())} voxels")
        if not free.any():
            empty.append(obj["name"])
    for name in empty:
        _log(f"fastsam3d: warning: {name} came out empty (0 voxels): the clicks may miss the structure; "
             "check them, or add a click inside it")
    if len(empty) == len(objects):
        _log(f"fastsam3d: error: the segmentation is empty: nothing was written to {args.output}")
        return 1
    out = sitk.GetImageFromArray(labelmap)
    out.CopyInformation(image)
    write_image_atomic(out, args.output)
    _log(f"wrote {args.output}" + (f" ({len(empty)} of {len(objects)} objects empty)" if empty else ""))
    return 1 if empty else 0


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from .evaluate import evaluate_cases, format_table, summarise, write_json
    from .session import Engine
    from .training.data import Case, read_manifest, read_nnunet_folder

    if args.image:
        if not args.label:
            raise ValueError("--image needs --label")
        cases = [Case(name=Path(args.image).name, image=Path(args.image), label=Path(args.label))]
    else:
        data = Path(args.data)
        if data.is_dir() and (data / "MANIFEST.json").is_file():
            data = data / "MANIFEST.json"
        cases = read_manifest(data) if data.is_file() else read_nnunet_folder(data)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
        if not cases:
            raise ValueError(f"no case named {args.cases}")
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    engine = Engine(model=args.model, device=args.device)
    _log(f"model {engine.model.config.name} on {engine.device_description}; rule {args.rule}, {args.clicks} clicks")
    bar = tqdm(desc="labels", unit="label", file=sys.stderr)
    started = time.perf_counter()
    results = evaluate_cases(engine, cases, rule=args.rule, n_clicks=args.clicks, seed=args.seed,
                             labels=labels, progress=lambda r: bar.update(1))
    bar.close()
    summary = summarise(results)
    print(format_table(summary))
    if args.json:
        write_json(args.json, summary, results, {
            "model": engine.model.config.name, "device": engine.device_description, "rule": args.rule,
            "clicks": args.clicks, "seed": args.seed, "seconds": time.perf_counter() - started})
        _log(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsam3d",
        description="Interactive 3D segmentation of CT and MRI from point clicks (FastSAM3D).")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment", help="segment objects in a scan from positive/negative points",
        description="Segment one object (or several with --prompts) in a 3D scan from clicks, "
                    "and write a labelmap on exactly the scan's voxel grid.",
        epilog="Example: fastsam3d segment ct.nii.gz -o liver.nii.gz --point -60,20,-110 --space ras. "
               "Exit status: 0 written, 1 an object came out empty (reported), 2 error (nothing written).")
    seg.add_argument("image", help="the scan: NIfTI, NRRD, MHA, ... file or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True,
                     help="labelmap to write (.nii.gz, .nii, .nrrd or .mha); written only when complete")
    seg.add_argument("--point", type=_parse_point, action=_ClickAction, const=True, dest="clicks",
                     metavar="X,Y,Z", help="a positive click: a point inside the object (repeatable)")
    seg.add_argument("--negative", type=_parse_point, action=_ClickAction, const=False, dest="clicks",
                     metavar="X,Y,Z", help="a negative click: a point that must stay outside (repeatable)")
    seg.add_argument("--space", choices=("ras", "lps", "ijk"), default="ras", help=SPACE_HELP)
    seg.add_argument("--random-weights", action="store_true",
                     help="allow --model fastsam3d / sam-med3d / fastsam3d-teacher without weights: an "
                          "untrained model (meaningless masks; for testing the pipeline only)")
    seg.add_argument("--prompts", metavar="FILE.json",
                     help='several objects: {"space": "ras", "objects": [{"label": 1, "name": "liver", '
                          '"points": [[x,y,z]], "negative": [[x,y,z]]}, ...]}; each object gets its label, '
                          'and no object overwrites an earlier one')
    _model_options(seg)
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser(
        "evaluate", help="score a model with simulated clicks against ground-truth labels",
        description="Simulate clicks against labelled scans and report Dice after 1, 3, 5 and 10 clicks, "
                    "computed on each scan's original grid.")
    ev.add_argument("data", nargs="?", help="a MANIFEST.json (or a folder holding one), or an nnU-Net "
                                            "folder with imagesTr/ and labelsTr/")
    ev.add_argument("--image", help="evaluate one scan (with --label) instead of a data set")
    ev.add_argument("--label", help="label file on the scan's grid (with --image)")
    ev.add_argument("--cases", help="comma-separated case names to keep")
    ev.add_argument("--labels", help="comma-separated label values to evaluate (default: all)")
    ev.add_argument("--rule", choices=("center", "reference"), default="center",
                    help="click rule: 'center' = deterministic (distance-transform centre of the largest "
                         "error), 'reference' = the SAM-Med3D/FastSAM3D rule (RITM, then random; seeded)")
    ev.add_argument("--clicks", type=int, default=10, help="clicks per object (default 10)")
    ev.add_argument("--seed", type=int, default=2023, help="random seed of the 'reference' rule")
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _model_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser(
        "train", help="train a model with simulated clicks (resumable, torchrun for several GPUs)",
        description="Interactive training as SAM-Med3D trains: per sample several simulated click steps "
                    "with the previous logits fed back. Writes OUT/checkpoint.pt, OUT/metrics.jsonl and "
                    "OUT/model.safetensors (fp16). Several GPUs: torchrun --nproc_per_node N -m "
                    "FastSAM3DLib.cli train ...",
        epilog="Example: fastsam3d train --data data/MANIFEST.json --out runs/a --steps 4000 "
               "--max-minutes 9 --resume")
    tr.add_argument("--model-config", metavar="NAME",
                    help="architecture to train: 'default' (the compact 6-block model), 'fastsam3d', "
                         "'sam-med3d' or 'fastsam3d-teacher' (default: the one stored in --init, else "
                         "'default')")
    tr.add_argument("--init", action="append", default=[], metavar="WEIGHTS",
                    help="start from these weights (repeatable; a later file replaces whole parts — image "
                         "encoder, prompt encoder, mask decoder — of earlier ones; parts no file holds "
                         "start fresh)")
    tr.add_argument("--decoder-lr-scale", type=float,
                    help="learning-rate multiplier of the prompt encoder and mask decoder (default: 0.1 "
                         "when --init supplies a decoder, as FastSAM3D fine-tunes, else 1)")
    tr.add_argument("--min-clicks", type=int, default=6, help="fewest click steps per sample (default 6)")
    tr.add_argument("--max-clicks", type=int, default=11, help="most click steps per sample (default 11)")
    _training_options(tr, steps=4000, lr=8e-4)
    tr.set_defaults(func=cmd_train)

    di = sub.add_parser(
        "distill", help="distil a smaller encoder from a teacher (layer-wise progressive, resumable)",
        description="Layer-wise progressive distillation (FastSAM3D, section 2.2): student block i matches "
                    "teacher block 2i with k = ceil(t L_s / T) active blocks, then the final embedding and "
                    "the decoder logits. Writes the student as OUT/model.safetensors (fp16), with the "
                    "teacher's prompt encoder and mask decoder.",
        epilog="Example: fastsam3d distill --teacher sam-med3d --teacher-weights sam_med3d_turbo.pth "
               "--data data/MANIFEST.json --out runs/student --steps 3000 --max-minutes 9 --resume")
    di.add_argument("--teacher", required=True,
                    help="teacher: a weights file (.safetensors/.pth; architecture detected), or an "
                         "architecture name ('sam-med3d', 'fastsam3d-teacher', 'fastsam3d') with "
                         "--teacher-weights")
    di.add_argument("--teacher-weights", action="append", default=[], metavar="WEIGHTS",
                    help="weights of a named teacher architecture (repeatable, merged by parts)")
    di.add_argument("--student-config", metavar="NAME",
                    help="student architecture: 'default' (the compact 6-block model), 'fastsam3d', ... "
                         "(default: the one stored in --init, else 'default')")
    di.add_argument("--init", action="append", default=[], metavar="WEIGHTS",
                    help="start the student from these weights (its prompt encoder and decoder are always "
                         "taken from the teacher)")
    di.add_argument("--layerwise-fraction", type=float, default=0.7,
                    help="share of the steps spent on layer-wise alignment before the final-output stage "
                         "(default 0.7)")
    di.add_argument("--train-decoder", action="store_true",
                    help="also train the student's prompt encoder and mask decoder (default: frozen "
                         "copies of the teacher's)")
    di.add_argument("--decoder-lr-scale", type=float, default=0.1,
                    help="learning-rate multiplier of the decoder with --train-decoder (default 0.1)")
    di.add_argument("--embedding-weight", type=float, default=1.0,
                    help="weight of the final-embedding MSE in the output stage (default 1)")
    di.add_argument("--logit-weight", type=float, default=1.0,
                    help="weight of the decoder-logit KL in the output stage (default 1)")
    di.add_argument("--min-clicks", type=int, default=2,
                    help="fewest click steps per sample in the logit stage (default 2)")
    di.add_argument("--max-clicks", type=int, default=5,
                    help="most click steps per sample in the logit stage (default 5)")
    _training_options(di, steps=3000, lr=8e-4)
    di.set_defaults(func=cmd_distill)

    web = sub.add_parser(
        "web", help="the interactive segmentation app in a web browser (needs the web extra)",
        description="Serve FastSAM3D as a web page (trame-slicer): four views, click to segment, "
                    "undo/redo, export. Binds to 127.0.0.1 only unless --host says otherwise; from "
                    "another computer use an SSH tunnel: ssh -L 8080:127.0.0.1:8080 server.",
        epilog="Needs: pip install -e .[web]. Example: fastsam3d web ct.nii.gz --port 8080")
    web.add_argument("images", nargs="*", metavar="IMAGE",
                     help="scans to load at start (NIfTI, NRRD, MHA or a DICOM folder); more can be uploaded")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this computer only)")
    web.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    web.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    web.add_argument("--max-upload-mb", type=int, default=2048,
                     help="largest upload the page accepts, in MiB (default 2048)")
    _model_options(web)
    web.set_defaults(func=cmd_web)
    return parser


def cmd_web(args) -> int:
    try:
        from .web.app import serve
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in ("trame", "trame_slicer", "trame_server", "trame_client", "trame_vuetify", "trame_rca",
                       "trame_common", "slicer", "vtk", "vtkmodules", "undo_stack", "LayerDMLib"):
            print(f"fastsam3d: error: 'fastsam3d web' needs the web extra ({missing} is missing): "
                  "pip install -e .[web]", file=sys.stderr)
            return 2
        raise
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be a positive number of MiB")
    return serve(args.images, host=args.host, port=args.port, model=args.model, device=args.device,
                 open_browser=args.open_browser, max_upload_bytes=args.max_upload_mb * 1024 ** 2)


def _training_options(parser: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """Options shared by train and distill: data, loop, budget, devices."""
    parser.add_argument("--data", action="append", default=[], metavar="MANIFEST_OR_FOLDER",
                        help="training data: a MANIFEST.json (or a folder holding one) or an nnU-Net folder "
                             "(imagesTr/, labelsTr/); repeatable. None: synthetic volumes only")
    parser.add_argument("--synthetic-ratio", type=float, default=0.5,
                        help="share of synthetic volumes among the samples (default 0.5)")
    parser.add_argument("--val-case", action="append", default=[], metavar="NAME",
                        help="case kept out of training (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: checkpoint.pt, metrics.jsonl, model.safetensors")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimiser steps in all (default {steps})")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step and process (default 4)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate of AdamW (default {lr})")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    parser.add_argument("--warmup-steps", type=int, default=100,
                        help="linear warm-up steps before the cosine decay (default 100)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.01,
                        help="final learning rate as a fraction of --lr (default 0.01)")
    parser.add_argument("--grad-clip", type=float, default=1.0,
                        help="gradient-norm clipping, 0 = off (default 1.0)")
    parser.add_argument("--max-minutes", type=float,
                        help="time budget: save a checkpoint and exit cleanly before it runs out")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt when it exists (else start)")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="steps between checkpoints (default 250)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default 10)")
    parser.add_argument("--workers", type=int, default=6,
                        help="data-loading processes per GPU/process (default 6)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of data, clicks and augmentation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where training runs (auto = the GPU if there is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_config(args):
    from .training.loop import RunConfig
    return RunConfig(
        out=Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, max_minutes=args.max_minutes, resume=args.resume, device=args.device,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        workers=args.workers, progress=not args.no_progress, started=_STARTED)


def _data_config(args):
    from .training.train import DataConfig
    return DataConfig(sources=tuple(args.data), synthetic_ratio=args.synthetic_ratio,
                      val_cases=tuple(args.val_case))


def cmd_train(args) -> int:
    from .training.train import InteractionConfig, TrainConfig, train

    config = TrainConfig(run=_run_config(args), data=_data_config(args),
                         interaction=InteractionConfig(min_steps=args.min_clicks, max_steps=args.max_clicks),
                         model_config=args.model_config, init=tuple(args.init),
                         decoder_lr_scale=args.decoder_lr_scale)
    train(config)
    return 0


def cmd_distill(args) -> int:
    from .training.distill import DistillConfig, distill
    from .training.train import InteractionConfig

    config = DistillConfig(run=_run_config(args), data=_data_config(args), teacher=args.teacher,
                           teacher_weights=tuple(args.teacher_weights), student_config=args.student_config,
                           init=tuple(args.init), layerwise_fraction=args.layerwise_fraction,
                           train_decoder=args.train_decoder, decoder_lr_scale=args.decoder_lr_scale,
                           embedding_weight=args.embedding_weight, logit_weight=args.logit_weight,
                           interaction=InteractionConfig(min_steps=args.min_clicks, max_steps=args.max_clicks))
    distill(config)
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (bundled), 'fastsam3d', 'sam-med3d', 'fastsam3d-teacher' or a weights "
                             "file (.safetensors, or an official FastSAM3D.pth / sam_med3d_turbo.pth)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto = the GPU if there is one)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_points(list(sys.argv[1:] if argv is None else argv)))
    if getattr(args, "command", None) == "evaluate" and not (args.data or args.image):
        parser.error("evaluate needs a data set or --image/--label")
    from .checkpoint import CheckpointError
    from .image import ImageError
    from .session import EngineError
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, *a, **k: f"fastsam3d: warning: {msg}\n"
        try:
            return args.func(args)
        except (ImageError, CheckpointError, EngineError, ValueError, OSError, RuntimeError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"fastsam3d: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fastsam3d: interrupted; nothing was written", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
