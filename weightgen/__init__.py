"""weightgen: generate ready-to-load neural-network weights for an architecture and a dataset."""
import os

# Before torch loads OpenMP: on shared cores a spinning second thread stalls every op (measured:
# the population build went from 108 s to 11 s with the passive policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "get_arch", "load_model", "model_config", "__version__"]


def __getattr__(name):
    """The arch registry on first use, not at ``import weightgen``: it imports torch (~1.5 s), which
    ``weightgen --help`` and the CLI's argument errors do not need."""
    if name in ("ARCHS", "build_model", "get_arch", "model_config"):
        from weightgen import archs

        return getattr(archs, name)
    raise AttributeError(f"module 'weightgen' has no attribute {name!r}")


def load_model(path, device=None):
    """The ready ``nn.Module`` from a directory holding model.safetensors + config.json."""
    from weightgen.sampling import load_model as _load

    return _load(path, device)
