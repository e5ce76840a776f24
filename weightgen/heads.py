"""Closed-form heads from the support set's class statistics, fitted on generated backbones.

Why: on held-out digit tasks the generated backbones are good (a probe on them reaches ~96 %)
but generated heads are not (~80 %), and under an input shift the zoo's features degrade while
a linear rule fitted to the user's own examples does not (benchmarks/RESULTS.md, "Generators:
experiments"). So, inside ``weightgen sample`` (declared in the manifest, never a gradient step):

* the head is shrinkage LDA (Friedman 1989; the Gaussian rule behind Simple CNAPS' Mahalanobis
  head) over what the classifier reads. Shrinkage and the relative weight of the two feature blocks
  below are chosen by stratified cross-validation on the support set, per candidate, and the
  candidates (n sampled backbones) are ranked by the same CV accuracy: selection reads the support
  set only, and the CV score is an honest-ish estimate (optimistic by the choice among configs);
* for MLPs, whose first layer reads the raw input, the classifier also reads the input itself:
  a linear function of x of rank r is exactly 2r ReLU units (relu(z) - relu(-z) = z), so an LDA
  over [x, generated features] fits in the architecture unchanged. The 2r units replace the
  generated hidden units that vary least on the support (label-free choice), in every hidden layer
  (deeper layers pass them through: relu(relu(z)) = relu(z)). With a feature weight of 0 this is
  LDA on the inputs alone, which CV picks when the generated features do not fit the data.

Everything is batched over candidates and folds from per-fold sufficient statistics (counts,
class sums, second moments), so the grid and the folds cost a few small solves, not refits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightgen.archs import get_arch

SHRINKAGES = (0.05, 0.2, 0.5, 0.8)
FEATURE_WEIGHTS = (0.0, 0.3, 1.0, 3.0)  # weight of generated features vs inputs (0: inputs only)
MAX_FOLDS = 5  # 5 and 10 folds chose equally well on zoo training tasks (94.8 vs 94.7 %), 5 costs half


@dataclass
class HeadFit:
    """What was fitted, per candidate: for the manifest and for selection."""

    cv_accuracy: torch.Tensor  # (n,) stratified-CV accuracy on the support (nan: too few examples)
    shrinkage: torch.Tensor  # (n,)
    feature_weight: torch.Tensor  # (n,); inf where no inputs block (not an MLP)
    folds: int
    input_units: int  # hidden units per layer given to the embedded input block (2r)

    def describe(self, i: int) -> dict:
        fw = float(self.feature_weight[i])
        return {"method": "shrinkage LDA over " + ("generated features" if math.isinf(fw) else
                                                   "inputs only" if fw == 0 else "inputs + generated features"),
                "shrinkage": float(self.shrinkage[i]), "feature_weight": None if math.isinf(fw) else fw,
                "input_units_per_layer": self.input_units, "cv_folds": self.folds,
                "cv_accuracy": None if math.isnan(float(self.cv_accuracy[i])) else float(self.cv_accuracy[i])}


def stratified_folds(y: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(fold id per example, number of folds): each class spread over the folds; folds <= the
    smallest class count, so every training part sees every class. 0 folds: a class has 1 example."""
    counts = torch.bincount(y, minlength=k)
    f = int(min(MAX_FOLDS, int(counts.min())))
    if f < 2:
        return torch.zeros_like(y), 0
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    for c in range(k):
        idx = (y == c).nonzero().flatten()
        fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % f
    return fold, f


def _stats(z: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, k: int, f: int):
    """Per-fold sufficient statistics of z (B, N, D): counts (F, K), class sums (B, F, K, D),
    second moments (B, F, D, D)."""
    f = max(f, 1)
    cnt = torch.zeros(f, k)
    sums = z.new_zeros(z.shape[0], f, k, z.shape[-1])
    second = z.new_zeros(z.shape[0], f, z.shape[-1], z.shape[-1])
    for i in range(f):
        zi, yi = z[:, fold == i], y[fold == i]
        cnt[i] = torch.bincount(yi, minlength=k)
        sums[:, i].index_add_(1, yi, zi)
        second[:, i] = zi.transpose(1, 2) @ zi
    return cnt, sums, second


def _moments(cnt, sums, second):
    """Class means (..., K, D) and pooled within-class covariance (..., D, D) from statistics."""
    n = cnt.sum(-1)
    mu = sums / cnt.clamp_min(1)[..., None]
    within = second - torch.einsum("...k,...kd,...ke->...de", cnt, mu, mu)
    return mu, within / (n - cnt.shape[-1]).clamp_min(1)[..., None, None]


def _lda(cnt, sums, second, shrink, scale):
    """LDA weights from statistics. cnt (..., K), sums (..., K, D), second (..., D, D); scale (..., D)
    multiplies the features, shrink (...,) pulls the covariance to its mean variance.
    Returns W (..., K, D), b (..., K) in the *unscaled* feature space."""
    mu, cov = _moments(cnt, sums, second)
    cov = cov * scale[..., :, None] * scale[..., None, :]
    d = cov.shape[-1]
    avg = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)
    eye = torch.eye(d, dtype=cov.dtype)
    cov = (1 - shrink)[..., None, None] * cov + (shrink * avg)[..., None, None] * eye
    mus = mu * scale[..., None, :]
    w = torch.linalg.solve(cov, mus.transpose(-1, -2)).transpose(-1, -2)  # (..., K, D) scaled space
    prior = (cnt / cnt.sum(-1).clamp_min(1)[..., None]).clamp_min(1e-8).log()
    b = -0.5 * (w * mus).sum(-1) + prior
    return w * scale[..., None, :], b


def fit_lda(z: torch.Tensor, y: torch.Tensor, k: int, n_inputs: int, *, seed: int = 0,
            shrinkages=SHRINKAGES, feature_weights=FEATURE_WEIGHTS):
    """Shrinkage LDA for each candidate's features z (B, N, D) whose first ``n_inputs`` columns are
    the (shared) inputs and the rest generated features. Hyper-parameters by stratified CV per
    candidate. Returns W (B, K, D), b (B, K) and a partial :class:`HeadFit`."""
    bsz, _, d = z.shape
    fold, f = stratified_folds(y, k, seed)
    # unit variance per block, so a feature weight compares blocks, not their units
    x_sd = z[..., :n_inputs].std(1).mean(-1, keepdim=True).clamp_min(1e-6) if n_inputs else None
    g_sd = z[..., n_inputs:].std(1).mean(-1, keepdim=True).clamp_min(1e-6) if d > n_inputs else None
    fws = feature_weights if n_inputs and d > n_inputs else ((0.0,) if n_inputs else (math.inf,))
    grid = [(s, w) for s in shrinkages for w in fws]

    def scale_for(w):  # (B, D)
        parts = []
        if n_inputs:
            parts.append((1.0 / x_sd).expand(bsz, n_inputs))
        if d > n_inputs:
            wg = 1.0 if math.isinf(w) else w
            parts.append((max(wg, 1e-6) / g_sd).expand(bsz, d - n_inputs))
        return torch.cat(parts, 1)

    cnt, sums, second = _stats(z, y, fold, k, f)
    tot_cnt, tot_sums, tot_second = cnt.sum(0), sums.sum(1), second.sum(1)
    if f >= 2:
        # every fold's training part: class means and pooled covariance, once; each feature weight
        # rescales them and is eigendecomposed once, so every shrinkage is a diagonal shift
        tr_cnt = (tot_cnt[None] - cnt)[None].expand(bsz, -1, -1)  # (B, F, K)
        mu, cov = _moments(tr_cnt, tot_sums[:, None] - sums, tot_second[:, None] - second)
        prior = (tr_cnt / tr_cnt.sum(-1, keepdim=True)).clamp_min(1e-8).log()  # (B, F, K)
        rows = torch.arange(len(y))
        acc = torch.empty(len(grid), bsz)
        for w in fws:
            sc = scale_for(w)
            if w == 0.0 and d > n_inputs:  # inputs only: generated features get no weight at all
                sc[:, n_inputs:] = 0
            sc = sc[:, None, :]  # (B, 1, D)
            cw = cov * sc[..., :, None] * sc[..., None, :]
            mw = mu * sc[..., None, :]
            avg = torch.diagonal(cw, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)  # (B, F)
            evals, evecs = torch.linalg.eigh(cw)
            proj = evecs.transpose(-1, -2) @ mw.transpose(-1, -2)  # (B, F, D, K)
            for s in shrinkages:
                lam = (1 - s) * evals.clamp_min(0) + s * avg[..., None]  # (B, F, D)
                ws = evecs @ (proj / lam[..., None])  # (B, F, D, K) in the scaled space
                W = ws.transpose(-1, -2) * sc[..., None, :]  # (B, F, K, D) on the raw features
                b = -0.5 * (ws.transpose(-1, -2) * mw).sum(-1) + prior
                logits = torch.einsum("bnd,bfkd->bfnk", z, W) + b[:, :, None, :]  # every fold's model, every row
                pick = logits[:, fold, rows]  # (B, N, K): each row scored by the model that did not see it
                acc[grid.index((s, w))] = (pick.argmax(-1) == y).float().mean(-1)
        best = acc.argmax(0)  # first of ties: the grid is ordered from more to less shrinkage-robust
        cv = acc.max(0).values
    else:
        best = torch.full((bsz,), grid.index((0.5, fws[min(1, len(fws) - 1)])))
        cv = torch.full((bsz,), float("nan"))
    shrink = torch.tensor([grid[i][0] for i in best.tolist()])
    fw = torch.tensor([grid[i][1] for i in best.tolist()], dtype=torch.float32)
    sc = torch.stack([scale_for(float(w))[i] for i, w in enumerate(fw.tolist())])
    sc[(fw == 0).nonzero().flatten()[:, None], torch.arange(n_inputs, d)[None]] = 0
    W, b = _lda(tot_cnt[None].expand(bsz, -1), tot_sums, tot_second, shrink, sc)
    return W, b, HeadFit(cv, shrink, fw, f, 0)


# --------------------------------------------------------------------------- into the architecture


def _mlp_layers(sd: dict[str, torch.Tensor]) -> int:
    i = 0
    while f"fcs.{i}.weight" in sd:
        i += 1
    return i


def _embed_inputs(wx: torch.Tensor, bx: torch.Tensor, mu: torch.Tensor):
    """A linear map x -> wx x + bx (B, K, D_in) as 2r ReLU pair units: (first-layer W (B, 2r, D_in),
    bias (B, 2r), head columns (B, K, 2r), head bias (B, K)); logits are unchanged up to a per-row
    constant (softmax-invariant centering), r = K - 1."""
    wc, bc = wx - wx.mean(1, keepdim=True), bx - bx.mean(1, keepdim=True)
    u, s, vh = torch.linalg.svd(wc, full_matrices=False)
    r = wc.shape[1] - 1
    dirs, coef = vh[:, :r], u[:, :, :r] * s[:, None, :r]  # (B, r, D), (B, K, r)
    off = torch.einsum("brd,d->br", dirs, mu)  # centre the pre-activations on the support mean
    w1 = torch.cat([dirs, -dirs], 1)
    b1 = torch.cat([-off, off], 1)
    return w1, b1, torch.cat([coef, -coef], 2), bc + torch.einsum("bkr,br->bk", coef, off)


def fit_head(arch: str, num_classes: int, input_shape, sd: dict[str, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], HeadFit]:
    """Replace the classifier of n stacked generated models ``sd`` by a closed-form head fitted
    on the support (x, y) — with the inputs embedded as ReLU pairs where the arch is an MLP with
    room for them. Returns the new stacked state dict and the fit (CV accuracy per candidate)."""
    k, spec = num_classes, get_arch(arch)
    sd = {name: v.float().clone() for name, v in sd.items()}
    x = x.flatten(1).float()
    layers = _mlp_layers(sd) if spec.family == "mlp" else 0
    pairs = 2 * (k - 1)
    if layers >= 2 and all(sd[f"fcs.{i}.weight"].shape[1] > pairs for i in range(layers - 1)):
        return _fit_mlp_with_inputs(sd, x, y, k, layers, pairs, seed)
    from weightgen.evaluate import complete, penultimate_many

    feats = penultimate_many(arch, k, input_shape, complete(arch, k, input_shape, sd), x.reshape(len(x), *input_shape))
    w, b, fit = fit_lda(feats, y, k, 0, seed=seed)
    wname, bname = _classifier_keys(arch, k, input_shape)
    sd[wname] = w
    if bname:
        sd[bname] = b
    return sd, fit


def _classifier_keys(arch, k, input_shape) -> tuple[str, str | None]:
    spec = get_arch(arch)
    names = [t.name for t in spec.tensors(k, input_shape) if t.name.startswith(spec.classifier + ".")]
    w = next(n for n in names if n.endswith("weight"))
    b = w[: -len("weight")] + "bias"
    return w, b if b in names else None


def _fit_mlp_with_inputs(sd, x, y, k, layers, pairs, seed):
    n = sd["fcs.0.weight"].shape[0]
    h = x[None].expand(n, -1, -1)
    replaced = []  # per hidden layer: (B, pairs) unit indices that carry the inputs block
    for i in range(layers - 1):
        w, b = sd[f"fcs.{i}.weight"], sd[f"fcs.{i}.bias"]
        if i > 0:  # units fed by the previous layer's input-carrying units would read the wrong thing
            w.scatter_(2, replaced[-1][:, None, :].expand(-1, w.shape[1], -1), 0.0)
        act = torch.relu(torch.einsum("bnd,bhd->bnh", h, w) + b[:, None])
        idx = act.var(1).argsort(-1)[:, :pairs]  # the least varying units make room (label-free)
        replaced.append(idx)
        h = act
    feats_idx = torch.stack([torch.tensor(sorted(set(range(h.shape[-1])) - set(r.tolist())))
                             for r in replaced[-1]])  # (B, H - pairs) generated units the head reads
    g = torch.gather(h, 2, feats_idx[:, None, :].expand(-1, len(x), -1))
    z = torch.cat([x[None].expand(n, -1, -1), g], 2)
    w, b, fit = fit_lda(z, y, k, x.shape[1], seed=seed)
    w1, b1, hw, hb = _embed_inputs(w[..., :x.shape[1]], b, x.mean(0))
    rows = torch.arange(n)[:, None]
    for i in range(layers - 1):  # the pair units: computed in layer 0, passed through the others
        wi, bi = sd[f"fcs.{i}.weight"], sd[f"fcs.{i}.bias"]
        r = replaced[i]
        if i == 0:
            wi[rows, r], bi[rows, r] = w1, b1
        else:
            wi[rows, r] = 0.0
            wi[rows[:, :, None], r[:, :, None], replaced[i - 1][:, None, :]] = torch.eye(pairs)
            bi[rows, r] = 0.0
    head = torch.zeros(n, k, h.shape[-1])
    head.scatter_(2, replaced[-1][:, None, :].expand(-1, k, -1), hw)
    head.scatter_(2, feats_idx[:, None, :].expand(-1, k, -1), w[..., x.shape[1]:])
    sd[f"fcs.{layers - 1}.weight"], sd[f"fcs.{layers - 1}.bias"] = head, hb
    fit.input_units = pairs
    return sd, fit


def embed_linear_classifier(arch: str, num_classes: int, input_shape, w: torch.Tensor, b: torch.Tensor,
                            mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """A linear classifier on the inputs (w (K, D), b (K,)) as the weights of an MLP arch: ReLU pairs
    in the first hidden layer, passed through the others, every other unit zero (one model, stacked)."""
    spec = get_arch(arch)
    sd = {t.name: torch.zeros(1, *t.shape) for t in spec.tensors(num_classes, input_shape)}
    layers = _mlp_layers(sd) if spec.family == "mlp" else 0
    pairs = 2 * (num_classes - 1)
    if layers < 2 or any(sd[f"fcs.{i}.weight"].shape[1] < pairs for i in range(layers - 1)):
        raise ValueError(f"{arch} has no room to embed a linear classifier of {num_classes} classes")
    w1, b1, hw, hb = _embed_inputs(w[None].float(), b[None].float(), mu.flatten().float())
    sd["fcs.0.weight"][:, :pairs], sd["fcs.0.bias"][:, :pairs] = w1, b1
    for i in range(1, layers - 1):
        sd[f"fcs.{i}.weight"][:, :pairs, :pairs] = torch.eye(pairs)
    sd[f"fcs.{layers - 1}.weight"][:, :, :pairs], sd[f"fcs.{layers - 1}.bias"] = hw, hb
    return sd
