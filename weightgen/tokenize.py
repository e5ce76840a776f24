"""Weight tokenization shared by every generator: standardize, cut into fixed-size tokens, invert.

A layer's weight is cut by output unit: token rows are ``[weight[o].flatten(), bias[o]]``,
chunked into ``token_dim`` pieces and zero-padded (so a token is one neuron's incoming weights,
the unit that permutation symmetry acts on). Tensors of modules without a ≥2-D weight (norm
scales, embeddings) are flattened together and chunked. Every token carries ids: the module
(``layer``), the position inside it (``pos``) and, for the classifier's rows, the class it
scores (``cls``, -1 elsewhere) — generators condition class rows on that class's embedding,
which makes the head equivariant to class order and lets one generator serve any class count.

Values are standardized per tensor with scalar statistics from the zoo (per-coordinate
statistics blow up on near-constant coordinates). ``detokenize(tokenize(w)) == w`` up to float
rounding; the chunking alone is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightgen.archs import get_arch


@dataclass(frozen=True)
class Piece:
    """A run of values of one token: ``length`` values of tensor ``name`` from flat offset ``src``
    (within a row ``row`` of that tensor, or of the flattened tensor when ``row`` is -1) go to
    token ``token`` at column ``col``."""

    name: str
    row: int
    src: int
    length: int
    token: int
    col: int


class TokenLayout:
    """How one (arch, num_classes, input_shape, mode) state dict maps to (T, token_dim) tokens."""

    def __init__(self, arch: str, num_classes: int, input_shape, mode: str = "full", token_dim: int | None = None):
        spec = get_arch(arch)
        self.arch, self.num_classes, self.input_shape, self.mode = arch, int(num_classes), tuple(input_shape), mode
        tensors = {t.name: t for t in spec.tensors(num_classes, input_shape)}
        self.keys = spec.generated_keys(num_classes, input_shape, mode)
        self.shapes = {k: tensors[k].shape for k in self.keys}
        groups: dict[str, list[str]] = {}
        for k in self.keys:
            groups.setdefault(k.rsplit(".", 1)[0] if "." in k else "", []).append(k)
        row_lens = [self._row_len(g, mod) for mod, g in groups.items() if f"{mod}.weight" in g and len(self.shapes[f"{mod}.weight"]) >= 2]
        self.token_dim = int(token_dim or min(max(row_lens or [64]), 256))
        self.modules = list(groups)
        pieces, layer, pos, cls = [], [], [], []
        for li, (mod, names) in enumerate(groups.items()):
            w = f"{mod}.weight"
            is_cls = mod == spec.classifier or mod.startswith(spec.classifier + ".")
            if w in names and len(self.shapes[w]) >= 2:
                rows = self.shapes[w][0]
                row_names = [w] + ([f"{mod}.bias"] if f"{mod}.bias" in names else [])
                rest = [n for n in names if n not in row_names]
                for r in range(rows):
                    col_total = 0
                    for j, n in enumerate(row_names):
                        n_len = math.prod(self.shapes[n][1:]) if n == w else 1
                        last = j == len(row_names) - 1  # pad to a token boundary after the row's last value
                        col_total = self._place(pieces, layer, pos, cls, n, r, n_len, col_total, li,
                                                r if is_cls and rows == num_classes else -1, last)
            else:
                rest = names
            col_total = 0
            for n in rest:  # flattened and chunked together
                col_total = self._place(pieces, layer, pos, cls, n, -1, math.prod(self.shapes[n]) or 1, col_total, li,
                                        -1, False)
        self.pieces = pieces
        self.layer = torch.tensor(layer, dtype=torch.long)
        self.pos = torch.tensor(pos, dtype=torch.long)
        self.cls = torch.tensor(cls, dtype=torch.long)
        self.num_tokens = len(layer)
        # Where a token sits for the generator: its position in its module, except that class rows
        # use only the chunk index within the row, so nothing but the class embedding tells classes apart.
        first_of_class: dict[tuple[int, int], int] = {}
        slot = []
        for t, (li, c) in enumerate(zip(layer, cls)):
            if c < 0:
                slot.append(pos[t])
            else:
                slot.append(t - first_of_class.setdefault((li, c), t))
        self.slot = torch.tensor(slot, dtype=torch.long)
        mask = torch.zeros(self.num_tokens, self.token_dim, dtype=torch.bool)
        for p in pieces:
            mask[p.token, p.col:p.col + p.length] = True
        self.mask = mask

    def _row_len(self, names, mod):
        w = self.shapes[f"{mod}.weight"]
        return math.prod(w[1:]) + (1 if f"{mod}.bias" in names else 0)

    def _place(self, pieces, layer, pos, cls, name, row, n, col_total, li, class_id, end_row):
        """Append ``n`` values of (name, row) continuing a token stream at column ``col_total``."""
        src = 0
        while src < n:
            if col_total % self.token_dim == 0:  # open a new token
                layer.append(li)
                same_layer = sum(1 for x in layer[:-1] if x == li)
                pos.append(same_layer)
                cls.append(class_id)
            col = col_total % self.token_dim
            take = min(n - src, self.token_dim - col)
            pieces.append(Piece(name, row, src, take, len(layer) - 1, col))
            src += take
            col_total += take
        if end_row:  # rows never share a token
            col_total = math.ceil(col_total / self.token_dim) * self.token_dim
        return col_total

    # ------------------------------------------------------------------ transforms

    def tokenize(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stacked state dict (name -> (B, *shape)) -> tokens (B, T, token_dim); pads are 0."""
        b = next(iter(sd.values())).shape[0]
        ref = sd[self.keys[0]]
        out = torch.zeros(b, self.num_tokens, self.token_dim, dtype=torch.float32, device=ref.device)
        flat = {k: sd[k].reshape(b, self.shapes[k][0], -1) if len(self.shapes[k]) >= 1 and self._is_row(k)
                else sd[k].reshape(b, -1) for k in self.keys}
        for p in self.pieces:
            src = flat[p.name][:, p.row] if p.row >= 0 else flat[p.name]
            out[:, p.token, p.col:p.col + p.length] = src[:, p.src:p.src + p.length].float()
        return out

    def detokenize(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`tokenize`: tokens (B, T, token_dim) -> name -> (B, *shape)."""
        b = tokens.shape[0]
        flat = {k: torch.zeros(b, *( (self.shapes[k][0], math.prod(self.shapes[k][1:]) or 1) if self._is_row(k)
                                     else (math.prod(self.shapes[k]) or 1,)), dtype=tokens.dtype, device=tokens.device)
                for k in self.keys}
        for p in self.pieces:
            dst = flat[p.name][:, p.row] if p.row >= 0 else flat[p.name]
            dst[:, p.src:p.src + p.length] = tokens[:, p.token, p.col:p.col + p.length]
        return {k: v.reshape(b, *self.shapes[k]) for k, v in flat.items()}

    def _is_row(self, name: str) -> bool:
        return any(p.name == name and p.row >= 0 for p in self.pieces)


class Standardizer:
    """Per-tensor scalar standardization with statistics fitted on a zoo stack."""

    def __init__(self, stats: dict[str, tuple[float, float]]):
        self.stats = stats

    @classmethod
    def fit(cls, sd: dict[str, torch.Tensor], eps: float = 1e-8) -> "Standardizer":
        return cls({k: (float(v.float().mean()), float(v.float().std().clamp_min(eps))) for k, v in sd.items()})

    def normalize(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.float() - self.stats[k][0]) / self.stats[k][1] for k, v in sd.items()}

    def denormalize(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v * self.stats[k][1] + self.stats[k][0] for k, v in sd.items()}

