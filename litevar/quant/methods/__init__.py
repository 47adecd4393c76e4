"""Quantization methods: one config and one handler each (registered as recipe steps on import)."""
from .gps import GPSConfig
from .litevar_mp import LiteVARConfig
from .osplus import OSPlusConfig
from .ptq4arvg import PTQ4ARVGConfig
from .rotation import RotationConfig
from .rtn import RTNConfig
from .smoothquant import SmoothQuantConfig
from .stwq import STWQConfig

__all__ = ["RTNConfig", "SmoothQuantConfig", "OSPlusConfig", "RotationConfig", "LiteVARConfig", "GPSConfig",
           "STWQConfig", "PTQ4ARVGConfig"]
