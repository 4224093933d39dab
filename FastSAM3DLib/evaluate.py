"""Click-simulation evaluation: how every model of the project is judged.

For each case and label, clicks are simulated by a named rule against the
ground truth on the image's original grid, the engine answers each click,
and the Dice score after every click is recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output_path
from .clicks import dice, simulate_click
from .image import ImageError, load_image
from .session import Engine

REPORTED_CLICKS = (1, 3, 5, 10)


@dataclass
class LabelResult:
    case: str
    label: int
    name: str
    dice: list[float]                           # after click 1, 2, ...
    clicks: list[tuple[tuple[int, int, int], bool]] = field(default_factory=list)   # (k,j,i), positive

    def dice_at(self, n: int) -> float:
        if not self.dice:
            return math.nan
        return self.dice[min(n, len(self.dice)) - 1]


def load_label(path, image: sitk.Image) -> np.ndarray:
    """Integer label array (k, j, i) on exactly the image's grid."""
    try:
        label = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ImageError(f"cannot read label file {path}") from None
    same_grid = (label.GetSize() == image.GetSize()
                 and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
                 and np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-4)
                 and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4))
    if not same_grid:
        raise ImageError(f"label {Path(path).name} is not on the image's voxel grid")
    return sitk.GetArrayFromImage(label).astype(np.int64)


def evaluate_label(engine: Engine, image: sitk.Image, gt: np.ndarray, rule: str, n_clicks: int,
                   seed: int, case: str = "", label: int = 1, name: str = "") -> LabelResult:
    """Simulate ``n_clicks`` clicks on one binary target (k, j, i) and score each."""
    session = engine.new_session(image)
    rng = np.random.default_rng(seed)
    spacing_kji = np.array(image.GetSpacing())[::-1]
    result = LabelResult(case, label, name, [])
    pred = np.zeros_like(gt, dtype=bool)
    for n in range(n_clicks):
        click = simulate_click(rule, n, pred, gt, rng, spacing_kji)
        if click is None:                       # nothing left to correct
            result.dice.append(result.dice[-1] if result.dice else dice(pred, gt))
            continue
        k, j, i = click.index
        session.add_click((i, j, k), positive=click.positive, space="ijk")
        pred = session.mask()
        result.clicks.append(((int(k), int(j), int(i)), bool(click.positive)))
        result.dice.append(dice(pred, gt))
    return result


def summarise(results: list[LabelResult]) -> dict:
    rows = [{"case": r.case, "label": r.label, "name": r.name,
             **{f"dice@{n}": r.dice_at(n) for n in REPORTED_CLICKS}} for r in results]
    mean = {f"dice@{n}": float(np.nanmean([r.dice_at(n) for r in results])) if results else math.nan
            for n in REPORTED_CLICKS}
    return {"per_label": rows, "mean": mean}


def format_table(summary: dict) -> str:
    header = f"{'case':<40} {'label':<24}" + "".join(f" {'Dice@' + str(n):>8}" for n in REPORTED_CLICKS)
    lines = [header, "-" * len(header)]
    for row in summary["per_label"]:
        lines.append(f"{row['case'][:40]:<40} {(str(row['label']) + ' ' + row['name'])[:24]:<24}"
                     + "".join(f" {row[f'dice@{n}']:8.3f}" for n in REPORTED_CLICKS))
    lines.append(f"{'mean':<65}" + "".join(f" {summary['mean'][f'dice@{n}']:8.3f}"
                                             for n in REPORTED_CLICKS))
    return "\n".join(lines)


def evaluate_cases(engine: Engine, cases, rule: str = "center", n_clicks: int = 10,
                   seed: int = 0, labels: list[int] | None = None, min_voxels: int = 10,
                   progress=None) -> list[LabelResult]:
    """cases: objects with ``name``, ``image``, ``label`` (paths) and ``label_names``."""
    results = []
    for case in cases:
        image = load_image(case.image)
        label_array = load_label(case.label, image)
        ids = labels or sorted(int(v) for v in np.unique(label_array) if v != 0)
        for label_id in ids:
            gt = label_array == label_id
            if gt.sum() < min_voxels:
                continue
            name = str(case.label_names.get(label_id, "")) if case.label_names else ""
            results.append(evaluate_label(engine, image, gt, rule, n_clicks, seed,
                                          case.name, label_id, name))
            if progress is not None:
                progress(results[-1])
    return results


def write_json(path, summary: dict, results: list[LabelResult], meta: dict) -> None:
    payload = {"meta": meta, **summary, "details": [asdict(r) for r in results]}
    with atomic_output_path(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1, default=float))
