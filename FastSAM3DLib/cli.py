"""``fastsam3d``: segment scans from point clicks, evaluate models, benchmark, train."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

SPACE_HELP = ("coordinate system of the points: 'ras' = Slicer world coordinates "
              "(Right-Anterior-Superior, mm), 'lps' = DICOM/ITK coordinates (mm), "
              "'ijk' = voxel index (i, j, k) of the image, counted from 0")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
            spec = json.loads(Path(args.prompts).read_text())
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


def cmd_segment(args) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .image import load_image, write_image_atomic
    from .session import Engine

    objects = _objects_from_args(args)
    image = load_image(args.image)
    _log(f"loaded {args.image}: {image.GetSize()} voxels, spacing {tuple(round(s, 3) for s in image.GetSpacing())} mm")
    engine = Engine(model=args.model, device=args.device)
    _log(f"model {engine.model.config.name} on {engine.device_description}")
    labelmap = np.zeros(image.GetSize()[::-1], dtype=np.uint16 if max(o["label"] for o in objects) > 255 else np.uint8)
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
    out = sitk.GetImageFromArray(labelmap)
    out.CopyInformation(image)
    write_image_atomic(out, args.output)
    _log(f"wrote {args.output}")
    return 0


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
        epilog="Example: fastsam3d segment ct.nii.gz -o liver.nii.gz --point -60,20,-110 --space ras")
    seg.add_argument("image", help="the scan: NIfTI, NRRD, MHA, ... file or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True,
                     help="labelmap to write (.nii.gz, .nii, .nrrd or .mha); written only when complete")
    seg.add_argument("--point", type=_parse_point, action=_ClickAction, const=True, dest="clicks",
                     metavar="X,Y,Z", help="a positive click: a point inside the object (repeatable)")
    seg.add_argument("--negative", type=_parse_point, action=_ClickAction, const=False, dest="clicks",
                     metavar="X,Y,Z", help="a negative click: a point that must stay outside (repeatable)")
    seg.add_argument("--space", choices=("ras", "lps", "ijk"), default="ras", help=SPACE_HELP)
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
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (bundled), 'fastsam3d', 'sam-med3d', 'fastsam3d-teacher' or a weights "
                             "file (.safetensors, or an official FastSAM3D.pth / sam_med3d_turbo.pth)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto = the GPU if there is one)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
