from .config import NAMED_CONFIGS, DecoderConfig, EncoderConfig, ModelConfig
from .sam3d import Sam3D

__all__ = ["DecoderConfig", "EncoderConfig", "ModelConfig", "NAMED_CONFIGS", "Sam3D"]
