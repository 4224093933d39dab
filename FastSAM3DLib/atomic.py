"""Write outputs whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _default_file_mode() -> int:
    """The mode a newly created file gets (0o666 less the process umask):
    ``mkstemp`` makes private 0600 files, an output should not stay one."""
    with _UMASK_LOCK:                   # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


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
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=full_suffix(path), dir=path.parent)
    except OSError as exc:              # name the user's path, not the temporary one
        raise PermissionError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise PermissionError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
