"""Files sent by the browser: written only into a temporary folder, under
generated names. The browser's file name is never used as a path; only its
extension is kept, and only from an allow-list.
"""

from __future__ import annotations

import re
from pathlib import Path

# Image formats the app loads (one file per volume, or a DICOM series of .dcm files).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")
MAX_UPLOAD_BYTES = 2 * 1024 ** 3


class UploadError(ValueError):
    """An upload that is refused (type not allowed, empty, too large)."""


def allowed_suffix(name) -> str | None:
    """The allow-listed extension of a browser file name (lower case), or None."""
    lower = str(name or "").strip().lower()
    for suffix in UPLOAD_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def display_name(name, default="volume") -> str:
    """A short, harmless label for a browser file name (for the UI and the
    download name only, never a path): extension dropped, anything but
    letters, digits, '-', '_' and '.' replaced, at most 64 characters."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    suffix = allowed_suffix(base)
    if suffix:
        base = base[: -len(suffix)]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")[:64]
    return base or default


def _content(file) -> bytes:
    content = file.get("content")
    if isinstance(content, list):
        content = b"".join(bytes(c) for c in content)
    if isinstance(content, str):               # never expected; refuse rather than guess
        raise UploadError("upload content arrived as text, not bytes")
    return bytes(content or b"")


def save_uploads(files, directory, max_bytes=MAX_UPLOAD_BYTES) -> list[tuple[Path, str]]:
    """Write browser files (trame file dicts: name, size, type, content) into
    ``directory`` as ``upload-000.nii.gz``, ``upload-001.dcm``... Returns
    [(path, display name)]. Raises UploadError before writing anything if a
    file is refused."""
    directory = Path(directory)
    checked = []
    total = 0
    for file in files or []:
        name = (file or {}).get("name", "")
        suffix = allowed_suffix(name)
        if suffix is None:
            raise UploadError(f"'{display_name(name, 'file')}' is not a supported image: "
                              f"use {', '.join(UPLOAD_SUFFIXES)}")
        declared = (file or {}).get("size")
        if isinstance(declared, (int, float)) and total + declared > max_bytes:
            raise UploadError(f"the upload is larger than {max_bytes // 1024 ** 2} MiB")
        content = _content(file)
        if not content:
            raise UploadError(f"'{display_name(name, 'file')}' is empty")
        total += len(content)
        if total > max_bytes:
            raise UploadError(f"the upload is larger than {max_bytes // 1024 ** 2} MiB")
        checked.append((suffix, content, display_name(name)))
    if not checked:
        raise UploadError("no file was received")
    out = []
    for n, (suffix, content, label) in enumerate(checked):
        path = directory / f"upload-{n:03d}{suffix}"
        path.write_bytes(content)
        out.append((path, label))
    return out
