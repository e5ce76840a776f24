"""weightgen: generate ready-to-load neural-network weights for an architecture and a dataset."""
import os

# Before torch loads OpenMP: on shared cores a spinning second thread stalls every op (measured:
# the population build went from 108 s to 11 s with the passive policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from weightgen.archs import ARCHS, build_model, get_arch, model_config

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "get_arch", "load_model", "model_config", "__version__"]


def load_model(path, device=None):
    """The ready ``nn.Module`` from a directory holding model.safetensors + config.json."""
    from weightgen.sampling import load_model as _load

    return _load(path, device)
