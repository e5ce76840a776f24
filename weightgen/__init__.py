"""weightgen: generate ready-to-load neural-network weights for an architecture and a dataset."""
from weightgen.archs import ARCHS, build_model, get_arch, model_config

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "get_arch", "load_model", "model_config", "__version__"]


def load_model(path, device=None):
    """The ready ``nn.Module`` from a directory holding model.safetensors + config.json."""
    from weightgen.sampling import load_model as _load

    return _load(path, device)
