"""FastSAM3DLib: the engine of the FastSAM3D 3D Slicer extension.

Pure Python (torch, numpy, SimpleITK). Never imports slicer, vtk or Qt outside
``FastSAM3DLib.slicer_bridge``.
"""

from .build import build_model
from .checkpoint import CheckpointError

__version__ = "0.1.0"
__all__ = ["build_model", "CheckpointError"]
