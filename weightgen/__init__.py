"""weightgen: generate ready-to-load neural-network weights for an architecture and a dataset."""
from weightgen.archs import ARCHS, build_model, get_arch, model_config

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "get_arch", "model_config", "__version__"]
