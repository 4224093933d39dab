"""FastSAM3DLib: the engine of the FastSAM3D 3D Slicer extension.

Pure Python (torch, numpy, SimpleITK). Never imports slicer, vtk or Qt outside
``FastSAM3DLib.slicer_bridge``. Importing the package itself loads nothing
heavy: in Slicer the module panel opens before PyTorch is installed.
"""

__version__ = "0.1.0"
__all__ = ["build_model", "CheckpointError"]


def __getattr__(name):
    if name == "build_model":
        from .build import build_model
        return build_model
    if name == "CheckpointError":
        from .checkpoint import CheckpointError
        return CheckpointError
    raise AttributeError(f"module 'FastSAM3DLib' has no attribute {name!r}")
