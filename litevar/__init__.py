"""litevar: load, compress and measure Visual AutoRegressive (VAR) image generators."""
from .models.configs import PRESETS, ConfigError, PipelineConfig, VARConfig, VQVAEConfig, from_name, load_config
from .models.loading import CheckpointError
from .pipeline import GenerationOutput, Pipeline, load_pipeline
from .recipe import Recipe, RecipeError, build_pipeline, load_recipe

__version__ = "0.1.0"
__all__ = ["PRESETS", "CheckpointError", "ConfigError", "GenerationOutput", "Pipeline", "PipelineConfig",
           "Recipe", "RecipeError", "VARConfig", "VQVAEConfig", "build_pipeline", "from_name", "load_config",
           "load_pipeline", "load_recipe"]
