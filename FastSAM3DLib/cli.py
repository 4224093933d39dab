"""``fastsam3d``: segment scans from point clicks and boxes, evaluate models, benchmark, train."""

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

SPACING_HELP = ("crop spacing of the model's input: 'auto' (zoom: each object's crop spacing follows its "
                "size), 'fixed' (the spacing the model was trained at), or a spacing in mm; default: auto "
                "for models trained across spacings, fixed for the official checkpoints (1.5 mm only)")
SPACE_HELP = ("coordinate system of the points: 'ras' = Slicer world coordinates "
              "(Right-Anterior-Superior, mm), 'lps' = DICOM/ITK coordinates (mm), "
              "'ijk' = voxel index (i, j, k) of the image, counted from 0")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# "--point -60,20,-110": argparse takes a value that starts with "-" for an option
# (only plain negative numbers are exempt), so such values are joined to their option.
_POINT_OPTIONS = ("--point", "--negative", "--box")
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


def _parse_box(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """'X1,Y1,Z1,X2,Y2,Z2' -> two opposite corners."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"'{text}' is not a box: write X1,Y1,Z1,X2,Y2,Z2 (two opposite "
                                         "corners, six numbers)")
    return values[:3], values[3:]


def _json_point(value) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{value!r} is not a point: write [x, y, z]")
    try:
        return _parse_point(",".join(map(str, value)))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _json_box(value) -> tuple:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"{value!r} is not a box: write [[x1, y1, z1], [x2, y2, z2]] (two opposite corners)")
    return tuple(_json_point(corner) for corner in value)


def _json_curve(value, what: str) -> list:
    """A scribble or lasso: {"points": [[x, y, z], ...], "positive": true}."""
    if not (isinstance(value, dict) and isinstance(value.get("points"), list) and value["points"]):
        raise ValueError(f"{value!r} is not a {what}: write {{\"points\": [[x, y, z], ...], \"positive\": true}}")
    return [_json_point(p) for p in value["points"]]


class _PromptAction(argparse.Action):
    """--point, --negative and --box append to one list, keeping the order they were typed."""

    def __call__(self, parser, namespace, value, option_string=None):
        prompts = getattr(namespace, "prompt_list", None) or []
        prompts.append(("box", value, True) if option_string == "--box" else ("click", value, self.const))
        namespace.prompt_list = prompts


def _json_prompts(obj: dict) -> list[tuple]:
    """An object's prompts in the order they are given: its box first, then its
    clicks (ordered "clicks", or "points" then "negative"), scribbles and lassos."""
    prompts = [("box", _json_box(obj["box"]), True)] if "box" in obj else []
    if "clicks" in obj:         # ordered: [{"point": [x, y, z], "positive": true}, ...]
        if not all(isinstance(c, dict) for c in obj["clicks"]):
            raise ValueError('each of "clicks" is {"point": [x, y, z], "positive": true}')
        prompts += [("click", _json_point(c.get("point")), bool(c.get("positive", True))) for c in obj["clicks"]]
    else:                       # positives first, then negatives
        prompts += ([("click", _json_point(p), True) for p in obj.get("points", [])]
                    + [("click", _json_point(p), False) for p in obj.get("negative", [])])
    for kind, key in (("scribble", "scribbles"), ("lasso", "lassos")):
        prompts += [(kind, _json_curve(c, kind), bool(c.get("positive", True))) for c in obj.get(key, [])]
    return prompts


def _objects_from_args(args) -> list[dict]:
    if args.prompts:
        try:
            spec = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the prompts file {args.prompts}: {exc}") from None
        space = spec.get("space", args.space)
        objects = []
        for n, obj in enumerate(spec.get("objects", []), start=1):
            try:
                prompts = _json_prompts(obj)
            except ValueError as exc:
                raise ValueError(f"object {n} of {args.prompts}: {exc}") from None
            if not any(positive for _, _, positive in prompts):
                raise ValueError(f"object {n} of {args.prompts} has no positive point or box")
            objects.append({"label": int(obj.get("label", n)), "name": obj.get("name", f"object {n}"),
                            "prompts": prompts, "space": obj.get("space", space)})
        if not objects:
            raise ValueError(f"{args.prompts} lists no objects (expected {{\"objects\": [...]}})")
        return objects
    if not args.prompt_list or not any(positive for _, _, positive in args.prompt_list):
        raise ValueError("give at least one --point (a positive click) or --box, or --prompts FILE.json")
    return [{"label": 1, "name": "object", "prompts": args.prompt_list, "space": args.space}]


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
        for kind, point, _ in obj["prompts"]:
            if kind == "click" and not is_inside(image, point_to_lps(image, point, obj["space"])):
                raise ImageError(f"the point {format_numbers(point, 2)} ({obj['space']}) of {obj['name']} "
                                 "lies outside the image")


def _add_prompt(session, kind: str, value, positive: bool, space: str):
    if kind == "box":
        return session.add_box(*value, space=space), f"box {value[0]} .. {value[1]}"
    if kind == "scribble":
        return session.add_scribble(value, positive=positive, space=space), \
            f"{'+' if positive else '-'} scribble of {len(value)} points"
    if kind == "lasso":
        return session.add_lasso(value, positive=positive, space=space), \
            f"{'+' if positive else '-'} lasso of {len(value)} points"
    return session.add_click(value, positive=positive, space=space), f"{'+' if positive else '-'} click at {value}"


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
    engine = Engine(model=args.model, device=args.device, spacing=args.spacing)
    _log(f"model {engine.model.config.name} on {engine.device_description}; "
         f"crop spacing {engine.spacing_setting}")
    labelmap = np.zeros(image.GetSize()[::-1], dtype=np.uint16 if max(o["label"] for o in objects) > 255 else np.uint8)
    empty = []
    for obj in objects:
        session = engine.new_session(image)
        for kind, value, positive in obj["prompts"]:
            try:
                result, described = _add_prompt(session, kind, value, positive, obj["space"])
            except (ValueError, RuntimeError) as exc:
                raise type(exc)(f"{obj['name']}: {exc}") from None
            _log(f"  {obj['name']}: {described} -> "
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

    from . import evaluate as ev
    from .training.data import Case, read_manifest, read_nnunet_folder

    if args.clicks < 1:
        raise ValueError("--clicks must be at least 1")
    if not 0 <= args.box_jitter < 1:
        raise ValueError("--box-jitter must be a fraction of the box's extent from 0 to below 1")
    if args.box_jitter and args.first_prompt != "box":
        raise ValueError("--box-jitter needs --first-prompt box")
    for option in ("jobs", "seeds", "min_voxels", "max_targets_per_case", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1")
    quality = {}
    if args.image:
        if not args.label:
            raise ValueError("--image needs --label")
        cases = [Case(name=Path(args.image).name, image=Path(args.image), label=Path(args.label))]
        quality[cases[0].name] = args.label_quality
    else:
        data = Path(args.data)
        if data.is_dir() and (data / "MANIFEST.json").is_file():
            data = data / "MANIFEST.json"
        cases = read_manifest(data) if data.is_file() else read_nnunet_folder(data)
        if data.is_file():
            quality = ev.manifest_label_quality(data)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = [name for name in wanted if name not in {c.name for c in cases}]
        if unknown:
            raise ValueError(f"no case named {', '.join(unknown)}")
        cases = [c for c in cases if c.name in wanted]
    labels = ev.parse_ids(args.labels) if args.labels else None
    subsets = [ev.parse_subset(text) for text in args.subset]
    for name, subset_case, _ in subsets:
        if subset_case not in {c.name for c in cases}:
            raise ValueError(f"subset {name} names case {subset_case}, which is not evaluated")
    ceiling = tuple(ev.parse_ceiling_settings(args.ceiling)) if args.ceiling else ()
    seeds = tuple(args.seed + n for n in range(args.seeds)) if args.rule == "reference" else (args.seed,)

    tasks = []
    for case in cases:
        image = ev.load_image(case.image)
        label_array = ev.load_label(case.label, image)
        keep = [i for name, subset_case, ids in subsets if subset_case == case.name for i in ids]
        tasks += [(case, t) for t in ev.select_targets(case, label_array, quality.get(case.name, "unknown"),
                                                       args.min_voxels, labels, keep,
                                                       args.max_targets_per_case)]
    if not tasks:
        raise ValueError(f"no target with at least {args.min_voxels} voxels in the selected cases")
    threads = args.threads or ev.threads_per_job(args.jobs)
    settings = ev.Settings(model=args.model, device=args.device, rule=args.rule, clicks=args.clicks,
                           seeds=seeds, baseline=args.baseline, ceiling=ceiling, threads=threads,
                           spacing=args.spacing, first_prompt=args.first_prompt, box_jitter=args.box_jitter)
    engine = None
    if args.jobs == 1:
        import torch

        from .session import Engine, require_box_prompts
        torch.set_num_threads(threads)
        engine = Engine(model=args.model, device=args.device, spacing=args.spacing)
        _log(f"model {engine.model.config.name} on {engine.device_description}; "
             f"crop spacing {engine.spacing_setting}")
        if args.first_prompt == "box":
            require_box_prompts(engine.model)
    _log(f"{len(tasks)} targets in {len(cases)} cases; rule {args.rule} ({len(seeds)} seed(s)), "
         f"{args.clicks} clicks; {args.jobs} process(es) x {threads} thread(s)")
    bar = tqdm(total=len(tasks), desc="targets", unit="target", file=sys.stderr)
    started = time.perf_counter()
    results = ev.run_targets(tasks, settings, jobs=args.jobs, engine=engine, progress=lambda r: bar.update(1))
    bar.close()
    seconds = time.perf_counter() - started
    summary = ev.summarise(results, args.clicks, subsets)
    jitter = f" (jitter {args.box_jitter:g} of its extent)" if args.box_jitter else ""
    first = (f"first prompt: the target's bounding box{jitter}, then clicks; Dice@k after k prompts "
             "(box + k-1 clicks; sphere: the box's inscribed ellipsoid); " if args.first_prompt == "box" else "")
    print(f"targets with >= {args.min_voxels} voxels; {first}rule {args.rule}"
          f"{f' (seeds {seeds[0]}..{seeds[-1]}: mean±sd over seeds)' if len(seeds) > 1 else ''}; "
          f"Dice on each scan's own grid; model {args.model}")
    print(ev.format_table(summary, per_target=args.per_target))
    if ceiling:
        print(ev.TABLE_NOTES)
    response = ev.format_click_response(summary)
    if response:
        print(response)
    latency_line = ev.format_latency(summary)
    if latency_line:
        from .build import resolve_device
        print(f"{latency_line} ({args.jobs} process(es) x {threads} thread(s) on "
              f"{resolve_device(args.device).type})")
    _log(f"{len(tasks)} targets in {seconds:.0f} s")
    if args.json:
        ev.write_json(args.json, summary, results, {
            "model": args.model, "device": args.device, "rule": args.rule, "clicks": args.clicks,
            "seeds": list(seeds), "baseline": args.baseline, "ceiling": list(ceiling),
            "first_prompt": args.first_prompt, "box_jitter": args.box_jitter,
            "fit_min_spacing_mm": ev.FIT_MIN_SPACING_MM, "min_voxels": args.min_voxels,
            "max_targets_per_case": args.max_targets_per_case, "cases": [c.name for c in cases],
            "subsets": [{"name": n, "case": c, "labels": ids} for n, c, ids in subsets],
            "jobs": args.jobs, "threads": threads, "seconds": seconds, "argv": sys.argv[1:]})
        _log(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsam3d",
        description="Interactive 3D segmentation of CT and MRI from point clicks (FastSAM3D).")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment", help="segment objects in a scan from positive/negative points",
        description="Segment one object (or several with --prompts) in a 3D scan from clicks and a box, "
                    "and write a labelmap on exactly the scan's voxel grid.",
        epilog="Example: fastsam3d segment ct.nii.gz -o liver.nii.gz --point -60,20,-110 --space ras. "
               "Exit status: 0 written, 1 an object came out empty (reported), 2 error (nothing written).")
    seg.add_argument("image", help="the scan: NIfTI, NRRD, MHA, ... file or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True,
                     help="labelmap to write (.nii.gz, .nii, .nrrd or .mha); written only when complete")
    seg.add_argument("--point", type=_parse_point, action=_PromptAction, const=True, dest="prompt_list",
                     metavar="X,Y,Z", help="a positive click: a point inside the object (repeatable)")
    seg.add_argument("--negative", type=_parse_point, action=_PromptAction, const=False, dest="prompt_list",
                     metavar="X,Y,Z", help="a negative click: a point that must stay outside (repeatable)")
    seg.add_argument("--box", type=_parse_box, action=_PromptAction, dest="prompt_list",
                     metavar="X1,Y1,Z1,X2,Y2,Z2",
                     help="a box around the object: two opposite corners in --space, axis-aligned in its axes "
                          "(voxel axes for ijk); with the points, in the order given (a later box replaces an "
                          "earlier one). Needs a model with box prompts (the bundled default model)")
    seg.add_argument("--space", choices=("ras", "lps", "ijk"), default="ras", help=SPACE_HELP)
    seg.add_argument("--random-weights", action="store_true",
                     help="allow --model fastsam3d / sam-med3d / fastsam3d-teacher without weights: an "
                          "untrained model (meaningless masks; for testing the pipeline only)")
    seg.add_argument("--prompts", metavar="FILE.json",
                     help='several objects: {"space": "ras", "objects": [{"label": 1, "name": "liver", '
                          '"box": [[x1,y1,z1],[x2,y2,z2]], "points": [[x,y,z]], "negative": [[x,y,z]], '
                          '"scribbles": [{"points": [[x,y,z], ...], "positive": true}], "lassos": [...]}, ...]}; '
                          'the box comes first; each object gets its label, and no object overwrites an '
                          'earlier one')
    _model_options(seg)
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser(
        "evaluate", help="score a model with simulated clicks against ground-truth labels",
        description="Simulate clicks against labelled scans and report Dice after 1, 3, 5 and 10 clicks, "
                    "computed on each scan's original grid: the model beside the sphere baseline and the "
                    "resolution ceiling, manual-label and model-label targets apart.",
        epilog="Validation set: scripts/evaluate_validation.sh WEIGHTS (see docs/evaluation.md)")
    ev.add_argument("data", nargs="?", help="a MANIFEST.json (or a folder holding one), or an nnU-Net "
                                            "folder with imagesTr/ and labelsTr/")
    ev.add_argument("--image", help="evaluate one scan (with --label) instead of a data set")
    ev.add_argument("--label", help="label file on the scan's grid (with --image)")
    ev.add_argument("--label-quality", choices=("manual", "model", "unknown"), default="unknown",
                    help="who drew the --label file (a manifest gives it per case)")
    ev.add_argument("--cases", help="comma-separated case names to keep")
    ev.add_argument("--labels", help="label values to evaluate, e.g. 1,2,37-38 (default: all)")
    ev.add_argument("--min-voxels", type=int, default=200,
                    help="skip targets with fewer voxels on the scan's grid (default 200)")
    ev.add_argument("--max-targets-per-case", type=int, metavar="N",
                    help="fast mode: at most N targets per case (--subset labels first, then spread over "
                         "the label ids)")
    ev.add_argument("--subset", action="append", default=[], metavar="NAME=CASE:IDS",
                    help="also report the mean over these labels of one case, e.g. "
                         "deep_grey=mri_brain_aal_colin27:37,38,71-78 (repeatable)")
    ev.add_argument("--rule", choices=("center", "reference"), default="center",
                    help="click rule: 'center' = deterministic (distance-transform centre of the largest "
                         "error), 'reference' = the SAM-Med3D/FastSAM3D rule (RITM, then random; seeded)")
    ev.add_argument("--clicks", type=int, default=10, help="clicks per object (default 10)")
    ev.add_argument("--first-prompt", choices=("click", "box"), default="click",
                    help="'box': the first prompt is the target's bounding box (world axes, from the label), "
                         "then --clicks - 1 clicks of --rule; Dice@k is after k prompts (needs a model with box "
                         "prompts, e.g. the bundled default model)")
    ev.add_argument("--box-jitter", type=float, default=0.0, metavar="F",
                    help="with --first-prompt box: move each box coordinate by up to F of the box's extent "
                         "(uniform, seeded; default 0)")
    ev.add_argument("--seed", type=int, default=2023, help="first random seed of the 'reference' rule")
    ev.add_argument("--seeds", type=int, default=3,
                    help="seeds of the 'reference' rule (seed, seed+1, ...; mean and spread; default 3)")
    ev.add_argument("--baseline", choices=("sphere", "none"), default="sphere",
                    help="'sphere' (default): also score a 12 mm ball at each positive click and a 6 mm "
                         "hole at each negative one, clicked by the same rule")
    ev.add_argument("--ceiling", nargs="?", const="1.5,fit", metavar="SPACINGS",
                    help="also report the resolution ceiling (Dice of perfect low-res logits) at these crop "
                         "spacings in mm; 'fit' = the finest spacing (>= 0.5 mm) at which one crop holds "
                         "the target (default when given alone: 1.5,fit)")
    ev.add_argument("--per-target", action="store_true", help="also print one row per target")
    ev.add_argument("--jobs", type=int, default=1,
                    help="worker processes, each with its own engine (default 1)")
    ev.add_argument("--threads", type=int,
                    help="torch threads per process (default: CPU cores / jobs)")
    ev.add_argument("--json", metavar="FILE", help="also write everything (per click, per seed) as JSON")
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
    tr.add_argument("--click-depth", type=_positive_int, default=1, metavar="N",
                    help="half of the clicks come from the error's core: its deepest non-empty level of "
                         "up to N erosions by 2 voxels (default 1; more puts them nearer the centre of the "
                         "thickest error, as users and the evaluation's centre rule click)")
    tr.add_argument("--first-click-depth", type=_positive_int, metavar="N",
                    help="the same for each sample's first click alone (default: --click-depth); deep "
                         "first clicks cost one click step's erosions, deep clicks all of them")
    tr.add_argument("--encoder-width", type=int, metavar="N",
                    help="image-encoder width of a fresh model (a multiple of 64; heads = N / 64), to "
                         "compare model sizes; default: the configuration's own")
    tr.add_argument("--box-prompts", action="store_true",
                    help="give the model box-corner embeddings (a fresh 'default' model, or one --init "
                         "without them) and train with boxes as first prompts")
    tr.add_argument("--box-probability", type=float, default=0.3,
                    help="share of steps whose first prompt is a box, for box-prompt models (default 0.3)")
    tr.add_argument("--multimask-first-click", action="store_true",
                    help="train the decoder's three multimask outputs on first clicks (lowest loss of "
                         "the three learnt, the IoU head picks one) and mark the model so that the engine "
                         "answers a lone first click with them; a model without them starts them from "
                         "its single-mask output (hypernetwork and IoU-head row copied)")
    tr.add_argument("--freeze-encoder", action="store_true",
                    help="keep the image encoder's weights (from --init) and train the prompt encoder and "
                         "mask decoder only: no backward pass through the encoder")
    tr.add_argument("--multimask-only", action="store_true",
                    help="with --multimask-first-click: train only the multimask outputs and the IoU head, "
                         "so that every prompt but a lone first click keeps the mask the --init weights give")
    tr.add_argument("--iou-loss-weight", type=float, default=1.0,
                    help="weight of the IoU head's squared error beside each mask's Dice + BCE (default 1, "
                         "as SAM); the head is what picks a first click's multimask output")
    tr.add_argument("--click-focus", type=_non_negative_float, default=0.0, metavar="W",
                    help="add W x the cross-entropy within 8 voxels of each step's newest click to the loss "
                         "over the whole crop (default 0), so that what a click says is not diluted")
    tr.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the per-voxel work of each click step (losses, click sampling) eagerly "
                         "on CUDA instead of compiling it with torch.compile")
    tr.add_argument("--benchmark", type=int, metavar="STEPS",
                    help="time STEPS training steps (after 3 warm-up steps) and print samples/s of the data "
                         "alone and of the whole step, and the peak GPU memory; writes nothing")
    _training_options(tr, steps=4000, lr=8e-4)
    tr.set_defaults(func=cmd_train)

    pk = sub.add_parser(
        "pack", help="build a training-data pack (all cases once, compact, for crops cut on the GPU)",
        description="Read every case of the sources once, turn it to RAS+ axes, quantise its image to int16 "
                    "and renumber its labels, and write one LZMA ZIP that `fastsam3d train --pack` loads into "
                    "GPU memory. Manifest entries with \"image\": null are label-only maps (images are "
                    "synthesised from them); entries marked \"stored_in_train_folder\": false (validation "
                    "cases) are left out.",
        epilog="Example: fastsam3d pack train.pack ../shared/data/train ../shared/data/label_maps")
    pk.add_argument("out", metavar="PACK", help="the pack file to write")
    pk.add_argument("sources", nargs="+", metavar="MANIFEST_OR_FOLDER",
                    help="data folders or MANIFEST.json files (as train --data), or label-map folders")
    pk.add_argument("--exclude", action="append", default=[], metavar="NAME",
                    help="case left out (repeatable), e.g. a validation case")
    pk.add_argument("--min-spacing", type=float, default=0.9, metavar="MM",
                    help="volumes finer than this are resampled to it (default 0.9 mm)")
    pk.set_defaults(func=cmd_pack)

    qu = sub.add_parser(
        "quantize", help="store a model's weights as int8 (half the size of fp16)",
        description="Write the model as safetensors with each weight matrix in int8 and one scale per "
                    "output channel (weight-only: the model still computes in float). Every command reads "
                    "the file as any other weights file. On the validation cases the bundled model's Dice "
                    "stayed within 0.005 of fp16 (Resources/models/README.md).",
        epilog="Example: fastsam3d quantize runs/a/model.safetensors runs/a/model-int8.safetensors")
    qu.add_argument("weights", metavar="WEIGHTS",
                    help="'default' (bundled) or a weights file (.safetensors, or an official .pth)")
    qu.add_argument("out", metavar="OUT", help="the .safetensors file to write")
    qu.set_defaults(func=cmd_quantize)

    av = sub.add_parser(
        "average", help="average the weights of runs trained from one another (a model soup)",
        description="Write the element-wise mean of the weights of two or more models of one "
                    "configuration as fp16 safetensors. Runs fine-tuned from a common model average into "
                    "one that often keeps what each learnt (Wortsman et al. 2022, 'Model soups'); models "
                    "trained apart do not average into anything useful.",
        epilog="Example: fastsam3d average default runs/b/model.safetensors --out runs/soup.safetensors")
    av.add_argument("weights", metavar="WEIGHTS", nargs="+",
                    help="'default' (bundled) or weights files (.safetensors, or official .pth)")
    av.add_argument("--out", required=True, metavar="OUT", help="the .safetensors file to write")
    av.set_defaults(func=cmd_average)

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
                 open_browser=args.open_browser, max_upload_bytes=args.max_upload_mb * 1024 ** 2,
                 spacing=args.spacing)


def _training_options(parser: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """Options shared by train and distill: data, loop, budget, devices."""
    parser.add_argument("--data", action="append", default=[], metavar="MANIFEST_OR_FOLDER",
                        help="training data: a MANIFEST.json (or a folder holding one) or an nnU-Net folder "
                             "(imagesTr/, labelsTr/); repeatable. None: synthetic volumes only")
    parser.add_argument("--pack", action="append", default=[], metavar="PACK",
                        help="training-data pack (fastsam3d pack; repeatable): crops are cut on the GPU from "
                             "it, and --data / --synthetic-ratio are not used")
    parser.add_argument("--oversample", action="append", default=[], type=_volume_weight, metavar="NAME=WEIGHT",
                        help="with --pack: draw this volume WEIGHT times as often as the others of its kind "
                             "(image volumes, label-only maps; repeatable)")
    parser.add_argument("--part-probability", type=float, default=0.0, metavar="P",
                        help="with --pack: how often a label of 20 ml or more gives a random part of it as the "
                             "target (a Voronoi cell: no edge in the image where it stops; default 0)")
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _volume_weight(text: str) -> tuple[str, float]:
    # Only the syntax here: the sampler refuses unknown names and weights that are not positive.
    name, _, weight = text.rpartition("=")
    try:
        if name:
            return name, float(weight)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {text!r}")


def _data_config(args):
    from .training.sampler import SamplerConfig
    from .training.train import DataConfig
    return DataConfig(sources=tuple(args.data), synthetic_ratio=args.synthetic_ratio,
                      val_cases=tuple(args.val_case), packs=tuple(args.pack),
                      sampler=SamplerConfig(volume_weights=tuple(args.oversample),
                                            part_probability=args.part_probability))


def cmd_train(args) -> int:
    from .training.train import InteractionConfig, TrainConfig, benchmark, train

    config = TrainConfig(run=_run_config(args), data=_data_config(args),
                         interaction=InteractionConfig(min_steps=args.min_clicks, max_steps=args.max_clicks,
                                                       box_probability=args.box_probability,
                                                       iou_loss_weight=args.iou_loss_weight,
                                                       click_depth=args.click_depth, first_click_depth=args.first_click_depth,
                                                       click_focus=args.click_focus,
                                                       compile=args.compile),
                         model_config=args.model_config, init=tuple(args.init),
                         decoder_lr_scale=args.decoder_lr_scale, box_prompts=args.box_prompts,
                         encoder_width=args.encoder_width, multimask_first_click=args.multimask_first_click,
                         freeze_encoder=args.freeze_encoder, multimask_only=args.multimask_only)
    if args.benchmark:
        print(json.dumps(benchmark(config, args.benchmark)))
        return 0
    train(config)
    return 0


def cmd_pack(args) -> int:
    from .training.pack import volumes_of_source, write_pack

    exclude = set(args.exclude)
    volumes = []
    for source in args.sources:
        volumes += volumes_of_source(source, exclude, args.min_spacing,
                                     progress=lambda v: _log(f"packed {v.name}: {v.label.shape}, "
                                                             f"{len(v.label_ids)} labels"))
    write_pack(args.out, volumes)
    _log(f"wrote {args.out}: {len(volumes)} volumes, {Path(args.out).stat().st_size / 1e6:.1f} MB")
    return 0


def _weights_file(name: str, hint: str = "") -> Path:
    """The file a weights argument names ("default": the bundled one); CheckpointError if absent."""
    from .build import DEFAULT_WEIGHTS
    from .checkpoint import CheckpointError

    source = DEFAULT_WEIGHTS if name == "default" else Path(name)
    if not source.is_file():
        raise CheckpointError(f"weights file not found: {source}{hint}")
    return source


def cmd_quantize(args) -> int:
    import torch

    from .build import build_model
    from .checkpoint import CONFIG_METADATA_KEY, QUANTIZATION_METADATA_KEY, CheckpointError, save_model

    source = _weights_file(args.weights, " (quantize needs a trained model's file)")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out.name}: the int8 file must end in .safetensors")
    model = build_model(str(source), device="cpu")
    # The source's provenance (e.g. "training") travels; its configuration is written anew.
    provenance = {}
    if source.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(source), framework="pt") as f:
            provenance = {k: v for k, v in (f.metadata() or {}).items()
                          if k not in (CONFIG_METADATA_KEY, QUANTIZATION_METADATA_KEY)}
    provenance.setdefault("quantized_from", source.name)
    save_model(model, out, dtype=torch.float16, int8=True, metadata=provenance)
    _log(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB (from {source.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_average(args) -> int:
    import torch

    from .build import build_model
    from .checkpoint import CheckpointError, save_model

    if len(args.weights) < 2:
        raise CheckpointError("average needs two or more weights files")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out.name}: the averaged file must end in .safetensors")
    sources = [_weights_file(w) for w in args.weights]
    models = [build_model(str(source), device="cpu") for source in sources]
    for source, model in zip(sources[1:], models[1:]):
        if model.config != models[0].config:
            raise CheckpointError(f"{source.name} is not the model {sources[0].name} is: only runs of one "
                                  "configuration can be averaged")
    states = [m.state_dict() for m in models]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}
    models[0].load_state_dict(mean)
    save_model(models[0], out, dtype=torch.float16,
               metadata={"averaged_from": ", ".join(args.weights)})
    _log(f"wrote {out}: the mean of {len(sources)} models")
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
    parser.add_argument("--spacing", type=_parse_spacing, metavar="auto|fixed|MM", help=SPACING_HELP)


def _parse_spacing(text: str):
    from .session import parse_spacing
    try:
        return parse_spacing(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_points(list(sys.argv[1:] if argv is None else argv)))
    if getattr(args, "command", None) == "evaluate" and not (args.data or args.image):
        parser.error("evaluate needs a data set or --image/--label")
    # ImageError, CheckpointError, EngineError, TrainingError and DataError are
    # ValueError / RuntimeError subclasses (not imported here: training runs
    # where SimpleITK is not installed).
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, *a, **k: f"fastsam3d: warning: {msg}\n"
        try:
            return args.func(args)
        except (ValueError, OSError, RuntimeError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"fastsam3d: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fastsam3d: interrupted; nothing was written", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
