"""litevar: load, compress and measure Visual AutoRegressive (VAR) image generators."""
from .models.configs import PRESETS, ConfigError, PipelineConfig, VARConfig, VQVAEConfig, from_name, load_config
from .models.loading import CheckpointError
from .pipeline import GenerationOutput, Pipeline, load_pipeline

__version__ = "0.1.0"
__all__ = ["PRESETS", "CheckpointError", "ConfigError", "GenerationOutput", "Pipeline", "PipelineConfig",
           "VARConfig", "VQVAEConfig", "from_name", "load_config", "load_pipeline"]
