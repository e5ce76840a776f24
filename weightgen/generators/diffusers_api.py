"""The parts of diffusers the generators use, imported once and ~1 s faster than ``import diffusers``.

Generators save and load through diffusers' ``ModelMixin`` / ``ConfigMixin`` and take their noise
schedules from it. Importing diffusers costs more than torch itself: ``diffusers.utils.torch_utils``
runs ``from torch._dynamo import allow_in_graph`` unconditionally, which imports the whole
torch.compile stack (measured 0.85-1.1 s of a ~3 s ``weightgen sample`` on 2 cores). diffusers
already falls back to a no-op decorator when that import fails (torch builds without dynamo), so
while diffusers is first imported we make exactly that import fail, then remove the block:
``torch._dynamo`` stays importable for anyone who compiles later. The decorator only marks
diffusers' own attention blocks for torch.compile; weightgen compiles none of them. transformers
is kept out the same way (diffusers imports it only for pipeline quantization configs, in a
try/except); it stays importable, and IGPG and the text encoders import it when they need it.
"""
from __future__ import annotations

import sys


# Imports diffusers makes only for features weightgen does not use, each already optional there:
# torch._dynamo (see above) and transformers (its pipeline quantization config, ~0.4-1 s on 2 cores).
OPTIONAL_FOR_DIFFUSERS = ("torch._dynamo", "transformers")


def _import():
    fresh = "diffusers" not in sys.modules
    blocked = [m for m in OPTIONAL_FOR_DIFFUSERS if fresh and m not in sys.modules]
    block = bool(blocked)
    for m in blocked:
        sys.modules[m] = None  # `from m import ...` raises ImportError
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.modeling_utils import ModelMixin
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    except ImportError:
        if not block:
            raise
        # some other diffusers version needs one of them at import: forget the half import, do it plainly
        for m in blocked:
            del sys.modules[m]
        block = False
        for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
            del sys.modules[name]
        return _import()
    finally:
        for m in blocked if block else ():
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    return ConfigMixin, register_to_config, ModelMixin, TimestepEmbedding, Timesteps, DDIMScheduler, DDPMScheduler


ConfigMixin, register_to_config, ModelMixin, TimestepEmbedding, Timesteps, DDIMScheduler, DDPMScheduler = _import()

__all__ = ["ConfigMixin", "register_to_config", "ModelMixin", "TimestepEmbedding", "Timesteps", "DDIMScheduler",
           "DDPMScheduler"]
