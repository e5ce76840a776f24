"""The parts of diffusers the generators use, imported once and ~1 s faster than ``import diffusers``.

Generators save and load through diffusers' ``ModelMixin`` / ``ConfigMixin`` and take their noise
schedules from it. Importing diffusers costs more than torch itself: ``diffusers.utils.torch_utils``
runs ``from torch._dynamo import allow_in_graph`` unconditionally, which imports the whole
torch.compile stack (measured 0.85-1.1 s of a ~3 s ``weightgen sample`` on 2 cores). diffusers
already falls back to a no-op decorator when that import fails (torch builds without dynamo), so
while diffusers is first imported we make exactly that import fail, then remove the block:
``torch._dynamo`` stays importable for anyone who compiles later. The decorator only marks
diffusers' own attention blocks for torch.compile; weightgen compiles none of them.
"""
from __future__ import annotations

import sys


def _import():
    block = "torch._dynamo" not in sys.modules and "diffusers" not in sys.modules
    if block:
        sys.modules["torch._dynamo"] = None  # `from torch._dynamo import ...` raises ImportError
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.modeling_utils import ModelMixin
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    except ImportError:
        if not block:
            raise
        # some other diffusers version needs dynamo at import: forget the half import, do it plainly
        del sys.modules["torch._dynamo"]
        block = False
        for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
            del sys.modules[name]
        return _import()
    finally:
        if block and sys.modules.get("torch._dynamo", 0) is None:
            del sys.modules["torch._dynamo"]
    return ConfigMixin, register_to_config, ModelMixin, TimestepEmbedding, Timesteps, DDIMScheduler, DDPMScheduler


ConfigMixin, register_to_config, ModelMixin, TimestepEmbedding, Timesteps, DDIMScheduler, DDPMScheduler = _import()

__all__ = ["ConfigMixin", "register_to_config", "ModelMixin", "TimestepEmbedding", "Timesteps", "DDIMScheduler",
           "DDPMScheduler"]
