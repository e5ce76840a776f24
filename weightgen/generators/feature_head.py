"""Classifier heads for a stored backbone, generated from the support's class-mean features.

Head mode for ``vit-*`` / ``resnet-18`` (issue 10): the backbone is stored once in the zoo and
only the task part is generated. The condition is what the classifier will read: the backbone's
features of the support set, summarised per class (class means, standardized by the training
features' statistics). A DeepSets network maps each class mean, with the mean of all classes'
encodings as context, to that class's row and bias, so the head is class-order equivariant and
takes any class count. The row is a learned linear map of the centred class mean (what a
shared-covariance Gaussian rule computes: w = A (mu_c - mu)) plus a non-linear correction, and
the bias follows the same rule (b = -w . (mu + (mu_c - mu) / 2)) plus a learned offset.

A starts from what the generator knows of its backbone's feature space: the inverse of the
within-class covariance of the head zoo's source features, shrunk by an amount chosen on source
tasks (``source_whitening``). Backbone features are strongly correlated, and class means alone
read through a diagonal scale reached 0.88x a linear probe on held-out classes; through the source
covariance 0.98x (RESULTS.md, ViT heads). Nothing here is computed from the user's support but
its class means: the covariance is the generator's, stored with it like its feature statistics.

Training data is a *head zoo* (``training/heads.py``): shrinkage-LDA heads fitted on cached
features of many k-class subsets of source classes. The loss is cross-entropy of the generated
head on query features of the task plus the distance to the zoo head (rows centred across
classes, where logits are invariant). Sampling draws n heads: the first from the whole support,
the others from bootstrap resamples of each class (the spread a class mean has at this support
size), so best-of-n has real alternatives to choose from; there is no latent noise.
"""
from __future__ import annotations

import torch
from torch import nn

from weightgen.generators import Condition, register_generator, register_preset
from weightgen.generators.base import Capabilities, WeightGenerator
from weightgen.generators.diffusers_api import register_to_config


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out))


SHRINKAGE_GRID = (1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@torch.no_grad()
def source_whitening(data, standardize, per_class: int, shrinkage: float | None = None, tasks: int = 60,
                     seed: int = 0) -> tuple[float, torch.Tensor]:
    """(shrinkage, (S + shrinkage I)^-1): the pooled within-class covariance S of the head zoo's
    standardized source features, its shrinkage (unless given) chosen on source tasks alone — S
    estimated from one half of each class's rows, the rule scored on ``per_class``-shot tasks drawn
    from the other half — then S re-estimated from all rows. Held-out classes play no part in the choice."""
    g = torch.Generator().manual_seed(seed)
    f = standardize(data.features.float())
    classes = sorted({c for cls in data.classes for c in cls})
    halves = {}
    for c in classes:
        idx = (data.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        halves[c] = (idx[: len(idx) // 2], idx[len(idx) // 2:])

    def within(rows_of) -> torch.Tensor:
        cen = torch.cat([f[rows_of[c]] - f[rows_of[c]].mean(0) for c in classes])
        return cen.T @ cen / len(cen)

    eye = torch.eye(f.shape[1])
    if shrinkage is not None:
        return shrinkage, torch.linalg.inv(within({c: torch.cat(h) for c, h in halves.items()}) + shrinkage * eye)
    s_half = within({c: h[0] for c, h in halves.items()})
    picks = [data.classes[i] for i in torch.randint(len(data.classes), (tasks,), generator=g).tolist()]
    draws = []
    for cls in picks:
        sup, qry = [], []
        for c in cls:
            other = halves[c][1][torch.randperm(len(halves[c][1]), generator=g)]
            sup.append(other[:per_class])
            qry.append(other[per_class:per_class + 100])
        draws.append((torch.stack([f[s].mean(0) for s in sup]), torch.cat([f[q] for q in qry]),
                      torch.cat([torch.full((len(q),), j) for j, q in enumerate(qry)])))
    scores = []
    for lam in SHRINKAGE_GRID:
        inv, acc = torch.linalg.inv(s_half + lam * eye), []
        for mu, q, y in draws:
            centre = mu.mean(0)
            w = (mu - centre) @ inv
            b = -(w * (centre + 0.5 * (mu - centre))).sum(-1)
            acc.append(float(((q @ w.T + b).argmax(-1) == y).float().mean()))
        scores.append(sum(acc) / len(acc))
    lam = SHRINKAGE_GRID[max(range(len(scores)), key=scores.__getitem__)]
    return lam, torch.linalg.inv(within({c: torch.cat(h) for c, h in halves.items()}) + lam * eye)


@register_generator("feature-head")
class FeatureHead(WeightGenerator):
    capabilities = Capabilities(modes=("head",), any_class_count=True)

    @register_to_config
    def __init__(self, arch: str = "vit-s", input_shape: tuple = (3, 32, 32), backbone_id: str = "",
                 feature_dim: int = 384, hidden: int = 256, mode: str = "head", train_num_classes: int | None = None,
                 train_class_counts: tuple = (2, 10), support_per_class: int = 16,
                 weight_key: str = "classifier.weight", bias_key: str = "classifier.bias", feature: str = "backbone",
                 condition_variance: bool = True, shift_limit: float | None = None, whiten_shrinkage: float = 0.0):
        super().__init__()
        d = feature_dim
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        self.register_buffer("whiten", torch.eye(d))  # used when whiten_shrinkage > 0 (see ``from_zoo``)
        self.lin = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.lin.weight)
        self.enc = _mlp(2 * d, hidden, hidden)
        self.dec = _mlp(2 * hidden + d, hidden, d + 1)
        nn.init.zeros_(self.dec[-1].weight)  # starts as the linear rule; the correction is learned
        nn.init.zeros_(self.dec[-1].bias)
        self.log_scale = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_zoo(cls, data, **config) -> FeatureHead:
        """A fresh generator for a head zoo (``training.heads.HeadZoo``: features + fitted heads)."""
        if not hasattr(data, "features") or not hasattr(data, "heads_w"):
            raise TypeError("feature-head trains on a head zoo of a stored backbone (weightgen heads train), "
                            f"not on {type(data).__name__}")
        model = cls(arch=data.arch, input_shape=tuple(data.input_shape), backbone_id=data.backbone_id,
                    feature_dim=data.features.shape[1], weight_key=data.weight_key, bias_key=data.bias_key,
                    train_class_counts=tuple(data.class_counts), **config)
        model.feat_mean.copy_(data.features.mean(0))
        model.feat_std.copy_(data.features.std(0).clamp_min(1e-6))
        lam = config.get("whiten_shrinkage")  # None: chosen on source tasks; 0: no whitening (the diagonal rule)
        if lam is None or lam > 0:
            lam, inv = source_whitening(data, model.standardize, model.support_per_class, lam)
            model.whiten.copy_(inv)
            model.register_to_config(whiten_shrinkage=lam)
        return model

    @property
    def stages(self) -> dict[str, list[nn.Parameter]]:
        return {"heads": list(self.parameters())}

    # ------------------------------------------------------------------ the network

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.feat_mean) / self.feat_std

    def heads(self, means: torch.Tensor, var: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized class means (B, K, D) and the pooled within-class variance (B, D) of the same
        draw -> head (W (B, K, D), b (B, K)) on standardized features. The variance is optional (one
        example per class has none): then 1, the training features' own scale."""
        centre = means.mean(1, keepdim=True)  # (B, 1, D)
        rel = means - centre
        if var is None or not self.config.condition_variance:
            var = torch.ones_like(means[:, 0])
        scaled = rel / (var[:, None] + 0.1)  # (B, K, D): the class mean in units of its spread
        h = self.enc(torch.cat([rel, scaled], -1))  # (B, K, H)
        ctx = h.mean(1, keepdim=True).expand_as(h)
        out = self.dec(torch.cat([h, ctx, rel], -1))  # (B, K, D + 1)
        linear = rel @ self.whiten if self.config.whiten_shrinkage else scaled
        w = (self.lin(linear) + out[..., :-1]) * self.log_scale.exp()
        b = -(w * (centre + 0.5 * rel)).sum(-1) + out[..., -1]
        return w, b

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: ``means`` (B, K, D) raw class means of a conditioning draw (``var`` (B, D): its pooled
        within-class variance), ``query`` (B, Q, D) raw
        features with ``query_y`` (B, Q), ``target_w`` (B, K, D) / ``target_b`` (B, K) the zoo heads
        on raw features."""
        var = batch.get("var")
        w, b = self.heads(self.standardize(batch["means"]), None if var is None else var / self.feat_std ** 2)
        q = self.standardize(batch["query"])
        logits = torch.einsum("bqd,bkd->bqk", q, w) + b[:, None]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), batch["query_y"].flatten())
        tw = batch["target_w"] * self.feat_std  # the zoo head on standardized features
        tw = tw - tw.mean(1, keepdim=True)
        gw = w - w.mean(1, keepdim=True)
        rel = ((gw - tw) ** 2).mean() / (tw ** 2).mean().clamp_min(1e-8)
        return {"loss": ce + batch.get("zoo_weight", 1.0) * rel, "ce": ce.detach(), "zoo_mse": rel.detach()}

    def shift_score(self, feats: torch.Tensor) -> float:
        """How far a support's features sit from the training features: the RMS over dimensions of
        their mean in training-feature standard deviations. Training records the largest score of
        its own head-zoo supports (``shift_limit``); a request above it is flagged."""
        return float(self.standardize(feats.float()).mean(0).pow(2).mean().sqrt())

    def to_raw(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A head on standardized features as one on raw features: w/s . x + (b - w/s . m)."""
        wr = w / self.feat_std
        return wr, b - (wr * self.feat_mean).sum(-1)

    @torch.no_grad()
    def sample(self, cond: Condition, n: int, generator: torch.Generator | None = None, **_) -> dict[str, torch.Tensor]:
        """n heads for a support of features ``cond.support`` (K, M, D): the first from all M per
        class, the others from bootstrap resamples of each class."""
        s = cond.support.float()
        if s.ndim != 3:  # e.g. raw images from weightgen.sampling (the HTTP API), which has no backbone path yet
            raise ValueError(f"feature-head reads a support of backbone features (K, M, D), got shape "
                             f"{tuple(s.shape)}; sample {self.config.arch} heads with `weightgen sample --arch "
                             f"{self.config.arch}`, which runs the stored backbone first")
        k, m, d = s.shape
        if d != self.config.feature_dim:
            raise ValueError(f"feature-head reads {self.config.feature_dim}-dim features of backbone "
                             f"{self.config.backbone_id[:12]}, got {d}")
        idx = torch.randint(0, m, (n, k, m), generator=generator)
        idx[0] = torch.arange(m)
        draws = torch.gather(s[None].expand(n, -1, -1, -1), 2, idx[..., None].expand(-1, -1, -1, d))
        var = draws.var(2).mean(1) / self.feat_std ** 2 if m > 1 else None  # (n, D) pooled, standardized
        w, b = self.to_raw(*self.heads(self.standardize(draws.mean(2)), var))
        return {self.config.weight_key: w.contiguous(), self.config.bias_key: b.contiguous()}

    def unfit_reason(self, arch: str, input_shape, num_classes: int | None = None, mode: str = "head") -> str | None:
        if arch != self.config.arch:
            return f"makes heads for {self.config.arch}, not {arch}"
        return None


register_preset("feature-head-tiny", "feature-head", hidden=16)
register_preset("feature-head-s", "feature-head", hidden=256)
