"""XBT: projections that map a new text encoder's embeddings into an old encoder's space.

Jang & Lim, "Towards Cross-modal Backward-compatible Representation Learning for Vision-Language
Models" (arXiv 2405.14715, no public code): a projection module maps a *new* encoder's embeddings
into the *old* one's space, trained on text alone with noise injected, so a system adopts the new
encoder without re-embedding its gallery. Here the "gallery" is everything conditioned on text:
the zoo's instructions as the generators learned them and every trained generator. With a
projection from ``new`` to ``old`` a request may embed its instruction with ``new`` and every
generator trained on ``old`` still reads it: no zoo re-embedding, no generator retraining.

* module: a residual MLP, y = normalize(A x + MLP(x)) with A optionally low-rank (``rank``). By
  default x is not the new encoder's pooled sentence embedding but a mean over its per-token states
  after one self-attention layer (``tokens=True``): paraphrase-MiniLM-L3's pooled embeddings barely
  tell "classify 3, 1 and 4" from "classify 1, 3 and 4" (recall@1 0.03 against its own gallery of
  300 instructions), so a map from them reached only 0.20 recall against the old gallery (0.52 x
  old->old); its token states still say which digits come where, and the same map from them
  retrieves held-out phrasings better than the old encoder's own queries (RESULTS.md, Encoder upgrades);
* training data: text only — every digit-subset task (2..10 classes) in the training phrasings the
  zoo stores, plus sentences from Python's bundled documentation (an offline English corpus);
  held-out phrasings (``EVAL_TEMPLATES``) are kept for evaluation;
* noise injection, as in the paper: Gaussian noise (``noise_std``, relative to the embedding norm)
  on the new embedding before the projection, so the map is smooth around the training texts;
* loss: a contrastive term (InfoNCE, temperature 0.05: each projected text must be nearer its own
  old embedding than the batch's other texts) plus cosine distance. Cosine alone reached 0.98
  similarity yet retrieved held-out instructions at 0.07 recall@1 (instructions differ by a few
  digits: small differences a cosine fit averages away); with the contrastive term 0.19.

Saved as safetensors + config.json (both encoders' names and weight hashes) under
``$WEIGHTGEN_HOME/xbt/NEW__to__OLD``; used automatically when a request's text encoder differs from
the one a generator was trained with (:func:`encode_for`).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from weightgen.generators.diffusers_api import ConfigMixin, ModelMixin, register_to_config
from weightgen.instructions import EVAL_TEMPLATES, TRAIN_TEMPLATES, phrase
from weightgen.paths import home
from weightgen.text import TEXT_ENCODERS, NoProjectionError, text_encoder


class Projection(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, old: str = "minilm-l6", new: str = "paraphrase-minilm-l3", old_version: str = "",
                 new_version: str = "", dim_in: int = 384, dim_out: int = 384, hidden: int = 512, rank: int = 0,
                 noise_std: float = 0.05, tokens: bool = False, token_layers: int = 1, heads: int = 4):
        super().__init__()
        if tokens:  # reads the new encoder's per-token states, not its pooled sentence embedding
            layer = nn.TransformerEncoderLayer(dim_in, heads, 2 * dim_in, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.mix = nn.TransformerEncoder(layer, token_layers, enable_nested_tensor=False)
        self.linear = (nn.Sequential(nn.Linear(dim_in, rank, bias=False), nn.Linear(rank, dim_out)) if rank
                       else nn.Linear(dim_in, dim_out))
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, dim_in) sentence embeddings, or (N, L, dim_in) token states with mask (N, L) for a
        token projection -> (N, dim_out), unit norm."""
        if self.config.tokens:
            h = self.mix(x, src_key_padding_mask=~mask)
            m = mask[..., None].to(h.dtype)
            x = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return nn.functional.normalize(self.linear(x) + self.mlp(x), dim=-1)

    def inputs(self, enc, texts: list[str]) -> tuple:
        """What this projection reads of ``texts`` from the new encoder ``enc``."""
        return enc.encode_tokens(texts) if self.config.tokens else (enc.encode(texts),)

    @torch.no_grad()
    def embed(self, enc, texts: list[str]) -> torch.Tensor:
        """``texts`` embedded by the new encoder ``enc`` and projected into the old one's space."""
        return torch.cat([self(*self.inputs(enc, texts[i:i + 512])) for i in range(0, len(texts), 512)]) \
            if texts else torch.zeros(0, self.config.dim_out)


def digit_tasks(n: int, seed: int = 0) -> list[list[int]]:
    """n distinct ordered digit subsets of 2..10 classes."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        t = tuple(rng.sample(range(10), rng.randint(2, 10)))
        if t not in seen:
            seen.add(t)
            out.append(list(t))
    return out


def sentences(part: str = "fit") -> list[str]:
    """Sentences of Python's bundled documentation (an offline English corpus): every fifth one is
    held out of fitting ("eval") to measure the map on text it never saw."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    sents = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    sents = [s for s in dict.fromkeys(sents) if 30 < len(s) < 200 and not any(c in s for c in "{}[]()=>*_:")]
    return [s for i, s in enumerate(sents) if (i % 5 == 4) == (part == "eval")]


def corpus(tasks: int = 1500, seed: int = 0, max_sentences: int | None = None) -> list[str]:
    """The training texts: instructions in the zoo's phrasings, plus documentation sentences."""
    return [phrase(t, tpl) for t in digit_tasks(tasks, seed) for tpl in TRAIN_TEMPLATES] + \
        sentences("fit")[:max_sentences]


def default_dir(new: str, old: str) -> Path:
    return home() / "xbt" / f"{new}__to__{old}"


def fit(old: str, new: str, out_dir: str | Path | None = None, steps: int = 1000, batch: int = 256,
        lr: float = 1e-3, noise_std: float = 0.1, rank: int = 0, seed: int = 0, temperature: float = 0.05,
        tasks: int = 1500, max_sentences: int | None = None, tokens: bool = True, show_progress: bool = True) -> Path:
    """Train and save the new -> old projection; returns its directory. ``tokens``: read the new
    encoder's per-token states (one self-attention layer, then mean pooling) instead of its pooled
    sentence embedding, which does not keep which digits an instruction names (see module docstring)."""
    torch.manual_seed(seed)
    enc_old, enc_new = text_encoder(old), text_encoder(new)
    texts = corpus(tasks, seed, max_sentences)
    y = enc_old.encode(texts)
    if tokens:
        states, masks = enc_new.encode_tokens(texts)
        x = states.half()  # 8,000 texts x 64 tokens x 384: 0.4 GB in half precision, 0.8 GB in float
    else:
        x, masks = enc_new.encode(texts), None
    proj = Projection(old=old, new=new, old_version=enc_old.version, new_version=enc_new.version, dim_in=enc_new.dim,
                      dim_out=enc_old.dim, hidden=1024, rank=rank, noise_std=noise_std, tokens=tokens)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=f"xbt {new} -> {old}", disable=not show_progress):
        idx = torch.randint(len(texts), (min(batch, len(texts)),), generator=g)
        xb = x[idx].float()
        # noise_std is relative to the norm of what it is added to (an embedding, or each token's state):
        # per coordinate it is noise_std * norm / sqrt(dim)
        scale = noise_std * xb.norm(dim=-1, keepdim=True) / xb.shape[-1] ** 0.5
        out = proj(xb + scale * torch.randn(xb.shape, generator=g), *([masks[idx]] if tokens else []))
        nce = nn.functional.cross_entropy(out @ y[idx].T / temperature, torch.arange(len(idx)))
        loss = nce + (1 - (out * y[idx]).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    out = Path(out_dir) if out_dir else default_dir(new, old)
    proj.eval().save_pretrained(str(out))
    return out


_IN_USE: dict[tuple[str, str], Path] = {}  # (new, old) -> a projection directory other than the default


def load_projection(new: str, old: str, root: str | Path | None = None) -> Projection:
    path = Path(root) if root else _IN_USE.get((new, old), default_dir(new, old))
    if not (path / "config.json").is_file():
        raise NoProjectionError(f"no projection from text encoder {new!r} into {old!r} (looked in {path.name}); "
                                f"fit one with `weightgen xbt fit --old {old} --new {new}` (minutes on 2 cores)")
    proj = Projection.from_pretrained(str(path)).eval()
    c = proj.config
    for role, name in (("new", new), ("old", old)):
        if c[role] != name or c[f"{role}_version"] != text_encoder(name).version:
            raise NoProjectionError(f"the projection in {path.name} was fitted for {role} encoder {c[role]} "
                                    f"{c[f'{role}_version']}, not {name} {text_encoder(name).version}; refit it")
    return proj


@torch.no_grad()
def encode_for(texts: list[str], target: str, via: str | None = None) -> tuple[torch.Tensor, dict]:
    """Embeddings of ``texts`` in ``target``'s space: by ``target`` itself, or by ``via`` then its
    projection into ``target`` (the XBT path). Returns (embeddings, what was used)."""
    if via is None or via == target:
        enc = text_encoder(target)
        return enc.encode(texts), {"text_encoder": enc.describe(), "projection": None}
    TEXT_ENCODERS.get(via)  # an unknown name says which encoders exist, before "no projection"
    proj = load_projection(via, target)
    enc = text_encoder(via)
    return proj.embed(enc, texts), {"text_encoder": enc.describe(),
                                    "projection": {"from": via, "to": target, **{k: proj.config[k] for k in
                                                   ("old_version", "new_version", "rank", "noise_std", "tokens")}}}


@torch.no_grad()
def recall_at_1(queries: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((queries @ gallery.T).argmax(1) == truth).float().mean())


@torch.no_grad()
def generation_accuracy(path: str | Path, tasks: int = 10, n: int = 8) -> dict:
    """Test accuracy of instruction-only samples (the default text-reading generator for mlp-s) on
    held-out digit class sets, in a held-out phrasing embedded by the old encoder vs by the new one
    through the projection in ``path``."""
    from weightgen.data import load_dataset
    from weightgen.data.digits import get_family
    from weightgen.evaluate import accuracy_many
    from weightgen.sampling import sample_from_instruction

    proj = Projection.from_pretrained(str(path))
    old, new = proj.config.old, proj.config.new
    names = get_family("digits-subsets").heldout_tasks(tasks, seed=1)["set"]
    acc = {"old": [], "projected": []}
    _IN_USE[(new, old)] = Path(path)
    try:
        for name in names:
            task = load_dataset(name)
            classes = [int(c) for c in name.split("classes=")[1].split(",")]
            for key, via in (("old", None), ("projected", new)):
                r = sample_from_instruction("mlp-s", phrase(classes, EVAL_TEMPLATES[0]), n=n, novelty=False,
                                            text_encoder=via)
                one = {k: v[None] for k, v in r.state_dict.items()}
                acc[key].append(float(accuracy_many("mlp-s", task.num_classes, task.input_shape, one, task.x_test,
                                                    task.y_test)))
    finally:
        _IN_USE.pop((new, old), None)
    return {"generation_tasks": len(names), "generation_acc_old": sum(acc["old"]) / len(names),
            "generation_acc_projected": sum(acc["projected"]) / len(names), "generator": r.manifest["generator"]}


@torch.no_grad()
def evaluate(path: str | Path, tasks: int = 300, seed: int = 1, generation: bool = True) -> dict:
    """Recall@1 of held-out-phrasing queries against the old encoder's gallery of training-phrasing
    instructions (one gallery entry per task, the first training template), on tasks not in the
    fitting corpus' draw: old->old, new->old raw, new->old projected."""
    proj = Projection.from_pretrained(str(path)).eval()
    old, new = text_encoder(proj.config.old), text_encoder(proj.config.new)
    fit_tasks = {tuple(t) for t in digit_tasks(1500, 0)}
    eval_tasks = [t for t in digit_tasks(tasks * 3, seed) if tuple(t) not in fit_tasks][:tasks]
    gallery = old.encode([phrase(t, TRAIN_TEMPLATES[0]) for t in eval_tasks])
    out = {"tasks": len(eval_tasks), "old": old.describe(), "new": new.describe()}
    for i, tpl in enumerate(EVAL_TEMPLATES):
        q = [phrase(t, tpl) for t in eval_tasks]
        truth = torch.arange(len(eval_tasks))
        out.setdefault("recall_old_old", []).append(recall_at_1(old.encode(q), gallery, truth))
        out.setdefault("recall_new_old_raw", []).append(recall_at_1(new.encode(q), gallery, truth))
        out.setdefault("recall_new_old_projected", []).append(recall_at_1(proj.embed(new, q), gallery, truth))
    for key in ("recall_old_old", "recall_new_old_raw", "recall_new_old_projected"):
        out[key] = sum(out[key]) / len(out[key])
    # the new encoder against its own gallery: how much of the distinction its embeddings carry at all
    gallery_new = new.encode([phrase(t, TRAIN_TEMPLATES[0]) for t in eval_tasks])
    out["recall_new_new"] = sum(recall_at_1(new.encode([phrase(t, tpl) for t in eval_tasks]), gallery_new,
                                            torch.arange(len(eval_tasks))) for tpl in EVAL_TEMPLATES) / len(EVAL_TEMPLATES)
    out["chance"] = 1 / len(eval_tasks)
    held = sentences("eval")  # the same held-out sentence: new-encoder query, old-encoder gallery
    truth = torch.arange(len(held))
    gallery_old = old.encode(held)
    out["sentences"] = len(held)
    out["identity_recall_raw"] = recall_at_1(new.encode(held), gallery_old, truth)
    out["identity_recall_projected"] = recall_at_1(proj.embed(new, held), gallery_old, truth)
    if generation:
        out.update(generation_accuracy(path))
    return out
