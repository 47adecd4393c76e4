"""litevar: load, compress and measure Visual AutoRegressive (VAR) image generators."""
from .version import __version__
from .jobs import JobList
from .models.configs import PRESETS, ConfigError, PipelineConfig, VARConfig, VQVAEConfig, from_name, load_config
from .models.loading import CheckpointError
from .pipeline import GenerationOutput, Pipeline, load_pipeline
from .recipe import Recipe, RecipeError, build_pipeline, load_recipe
# The recipe steps litevar ships register themselves in litevar.registry on import. Every litevar module is
# imported after this package, so any recipe parsed anywhere sees them; the registry itself stays below them.
from .attention import guidance as _guidance, steps as _attention_steps, token_prune as _token_prune  # noqa: F401
from .kvcompress import steps as _kv_steps  # noqa: F401
from .quant import decoder as _decoder_int8, methods as _quant_methods  # noqa: F401
from . import draft_refine as _draft_refine  # noqa: F401

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "GenerationOutput", "JobList", "Pipeline", "PipelineConfig",
           "Recipe", "RecipeError", "VARConfig", "VQVAEConfig", "build_pipeline", "from_name", "load_config",
           "load_pipeline", "load_recipe"]
