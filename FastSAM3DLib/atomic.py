"""Write outputs whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def full_suffix(path: Path) -> str:
    """'.nii.gz' for 'x.nii.gz', '.seg.nrrd' stays '.nrrd' (writers look at the last parts)."""
    suffixes = path.suffixes
    return "".join(suffixes[-2:]) if suffixes[-2:] == [".nii", ".gz"] else path.suffix


@contextlib.contextmanager
def atomic_output_path(path):
    """Yield a temporary path beside ``path`` (same extension, so writers that
    choose the format by extension still work); on success it replaces
    ``path`` in one step, on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=full_suffix(path), dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
