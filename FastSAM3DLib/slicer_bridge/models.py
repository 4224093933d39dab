"""The model choice: the bundled default, or official weights the user imports
from disk (FastSAM3D.pth, sam_med3d_turbo.pth, ...). No downloads, no keys.

An imported file is checked by building the model from it (strict load: a
wrong or damaged file is refused with one clear line), then cached as
safetensors in Slicer's settings folder, so later sessions never unpickle it
again. Safe to call on a worker thread: no MRML, no Qt.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class ModelEntry:
    name: str            # what the user sees
    value: str           # what Engine(model=...) takes: "default" or a file path
    description: str = ""


def models_directory(settings_directory) -> Path:
    """<Slicer settings folder>/FastSAM3D/models (created)."""
    path = Path(settings_directory) / "FastSAM3D" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def available_models(models_dir) -> list[ModelEntry]:
    entries = [ModelEntry("FastSAM3D (bundled)", DEFAULT_MODEL, "weights shipped with the extension")]
    for path in sorted(Path(models_dir).glob("*.safetensors")):
        info = {}
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
        entries.append(ModelEntry(info.get("name", path.stem), str(path), info.get("description", "")))
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(source, models_dir, name=None) -> ModelEntry:
    """Check a weights file and cache it. Raises ValueError (incl. the engine's
    CheckpointError) with a one-line reason if it is not a usable model."""
    from FastSAM3DLib.build import build_model
    from FastSAM3DLib.checkpoint import describe, save_model

    source = Path(source)
    if not source.is_file():
        raise ValueError(f"weights file not found: {source}")
    if source.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"{source.name}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    digest = _sha256(source)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.stem) + "-" + digest[:8]
    target = Path(models_dir) / f"{stem}.safetensors"
    info = {"name": name or source.stem, "source": source.name, "sha256": digest}
    if not target.is_file():
        model = build_model(str(source), device="cpu")          # strict: refuses a wrong file
        info["description"] = describe(model.config)
        save_model(model, target, metadata={"source": source.name, "sha256": digest})
        target.with_suffix(".json").write_text(json.dumps(info, indent=1))
    else:
        try:
            info = {**info, **json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))}
        except (OSError, ValueError):
            pass
    return ModelEntry(info["name"], str(target), info.get("description", ""))


def remove_model(entry_value) -> None:
    path = Path(entry_value)
    if path.suffix == ".safetensors" and path.is_file():
        path.unlink()
        path.with_suffix(".json").unlink(missing_ok=True)
