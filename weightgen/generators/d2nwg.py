"""D2NWG: dataset-conditioned latent diffusion over neural-network weights.

Soro et al., "Diffusion-Based Neural Network Weights Generation", ICLR 2025 (arXiv 2402.18153).
Stage 1 trains a VAE over weight tokens; stage 2 trains a latent diffusion model whose
transformer denoiser is conditioned on a dataset embedding from an intra- then inter-class set
encoder over the support set, with classifier-free guidance.

Where this differs from the paper's code, and why (see shared/research/feasibility.md: a flat
MLP VAE reconstructed *unseen-task* weights at ~54 % accuracy, capping everything after it):

* tokens are neurons (``weightgen.tokenize``) of a permutation-aligned zoo, and the VAE is
  applied per token with shared parameters, so it learns a local code that transfers to weights
  of tasks it never saw, instead of memorizing the zoo manifold;
* the classifier's rows are tied to their class: row i's token gets class i's embedding and no
  position id, so the head is equivariant to class order and any class count can be generated;
* schedules come from diffusers (DDPM to train; DDIM, <= 50 steps, to sample) and the sampling
  loop is written out in :meth:`D2NWG.sample`.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from weightgen.encoders import FEATURES, DatasetEncoder
from weightgen.generators import Condition, register_generator, register_preset
from weightgen.generators.base import Capabilities, WeightGenerator
from weightgen.generators.common import TokenIds, WeightStats, decode_tokens, layout_for, masked_mse
from weightgen.generators.diffusers_api import (DDIMScheduler, DDPMScheduler, TimestepEmbedding, Timesteps,
                                                register_to_config)


def mlp(i: int, h: int, o: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(i, h), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(h, h), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(h, o))


JOINT_GUIDANCE_MAX_N = 4  # up to this many samples, the two guidance halves share one denoiser call


class TokenVAE(nn.Module):
    """Per-token VAE: token + its ids -> latent (mu, logvar) -> token. Shared over all tokens."""

    def __init__(self, token_dim, latent_dim, hidden, depth, num_modules, max_slot):
        super().__init__()
        self.ids = TokenIds(num_modules, max_slot, hidden)
        self.enc_in = nn.Linear(token_dim, hidden)
        self.enc = mlp(hidden, hidden, 2 * latent_dim, depth)
        self.dec_in = nn.Linear(latent_dim, hidden)
        self.dec = mlp(hidden, hidden, token_dim, depth)

    def encode(self, tokens, layout):  # (B, T, C) -> mu, logvar (B, T, Z)
        h = F.gelu(self.enc_in(tokens) + self.ids(layout, tokens.device))
        mu, logvar = self.enc(h).chunk(2, -1)
        return mu, logvar.clamp(-12, 6)

    def decode(self, z, layout):  # (B, T, Z) -> (B, T, C)
        return self.dec(F.gelu(self.dec_in(z) + self.ids(layout, z.device)))


class Denoiser(nn.Module):
    """Transformer over latent weight tokens with in-context condition tokens
    [time, dataset, class_1..class_K]; class-row tokens also get their class's embedding."""

    def __init__(self, latent_dim, d_model, depth, heads, cond_dim, num_modules, max_slot, feat_dim=0):
        super().__init__()
        self.inp = nn.Linear(latent_dim, d_model)
        self.feat_proj = nn.Linear(feat_dim + 1, d_model) if feat_dim else None
        self.ids = TokenIds(num_modules, max_slot, d_model)
        self.time_proj = Timesteps(d_model, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(d_model, d_model)
        self.cond_proj = nn.Linear(cond_dim, d_model)
        self.type_emb = nn.Parameter(torch.randn(3, d_model) * 0.02)  # time / dataset / class condition tokens
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z, t, cls_emb, ds_emb, layout, feats=None):
        """z (B, T, Z); t (B,); cls_emb (B, K, Dc); ds_emb (B, Dc); feats (B, K, F+1) or None
        -> prediction (B, T, Z)."""
        b, n_tok, _ = z.shape
        temb = self.time_emb(self.time_proj(t).to(z.dtype))  # (B, D)
        cls = self.cond_proj(cls_emb)  # (B, K, D)
        if feats is not None and self.feat_proj is not None:
            cls = cls + self.feat_proj(feats)
        x = self.inp(z) + self.ids(layout, z.device) + temb[:, None]
        cls_idx = layout.cls.to(z.device)
        is_cls = (cls_idx >= 0)
        if is_cls.any():
            x = x + is_cls[None, :, None] * torch.gather(
                cls, 1, cls_idx.clamp_min(0)[None, :, None].expand(b, -1, cls.shape[-1]))
        cond = torch.cat([(temb + self.type_emb[0])[:, None], (self.cond_proj(ds_emb) + self.type_emb[1])[:, None],
                          cls + self.type_emb[2]], 1)
        h = self.blocks(torch.cat([cond, x], 1))[:, cond.shape[1]:]
        return self.out(self.norm(h))


@register_generator("d2nwg")
class D2NWG(WeightGenerator):
    capabilities = Capabilities(reconstruct=True, gate_after="vae", ema_stages=("diffusion",), priority=10)

    @register_to_config
    def __init__(self, arch: str = "mlp-s", input_shape: tuple = (64,), train_num_classes: int = 5, mode: str = "full",
                 token_dim: int = 65, num_modules: int = 2, max_slot: int = 32, feature: str = "raw",
                 stat_names: tuple = (), latent_dim: int = 32, vae_hidden: int = 256, vae_depth: int = 2,
                 kl_weight: float = 1e-4, latent_noise: float = 0.05, d_model: int = 128, depth: int = 4,
                 heads: int = 4, cond_dim: int = 128, cond_depth: int = 2, p_uncond: float = 0.1,
                 prediction_type: str = "sample", num_train_timesteps: int = 1000, sample_steps: int = 4,
                 guidance: float = 2.0, support_per_class: int = 10, latent_scale: float = 1.0,
                 feature_dim: int = 0, p_drop_features: float = 0.2, head_loss_share: float = 0.5,
                 imprint_head: bool = False):
        super().__init__()
        self.features = FEATURES.get(feature)(tuple(input_shape))
        self.stats = WeightStats(arch, train_num_classes, tuple(input_shape), list(stat_names))
        self.vae = TokenVAE(token_dim, latent_dim, vae_hidden, vae_depth, num_modules, max_slot)
        self.encoder = DatasetEncoder(self.features.dim, cond_dim, cond_depth)
        self.denoiser = Denoiser(latent_dim, d_model, depth, heads, cond_dim, num_modules, max_slot, feature_dim)
        self.null_cls = nn.Parameter(torch.zeros(cond_dim))
        self.null_ds = nn.Parameter(torch.zeros(cond_dim))
        self.register_buffer("latent_std", torch.tensor(float(latent_scale)))
        self.register_buffer("imprint_scale", torch.tensor(1.0))
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                             beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_zoo(cls, data, **config) -> "D2NWG":
        lay = data.layout
        if config.pop("feature_conditioning", True) and any(c >= 0 for c in lay.cls.tolist()):
            config.setdefault("feature_dim", _classifier_in_features(data.arch, data.num_classes, data.input_shape))
        model = cls(arch=data.arch, input_shape=tuple(data.input_shape), train_num_classes=data.num_classes,
                    mode=data.mode, token_dim=lay.token_dim, num_modules=len(lay.modules),
                    max_slot=int(lay.slot.max()) + 1, stat_names=tuple(lay.keys), **config)
        model.stats.set(data.standardizer, data.align_ref)
        if model.config.imprint_head and model.config.feature_dim:
            model.fit_imprint_scale(data)
        return model

    @property
    def stages(self) -> dict[str, list[nn.Parameter]]:
        """Stage name -> parameters it trains, in training order (the VAE is frozen afterwards)."""
        return {"vae": list(self.vae.parameters()),
                "diffusion": [p for n, p in self.named_parameters() if not n.startswith("vae.")]}

    def layout(self, num_classes: int):
        c = self.config
        return layout_for(c.arch, int(num_classes), tuple(c.input_shape), c.mode, c.token_dim)

    def embed(self, support: torch.Tensor):
        """support (B, K, M, *input_shape) -> class embeddings (B, K, Dc), dataset embedding (B, Dc)."""
        b, k, m = support.shape[:3]
        feats = self.features(support.reshape(b * k * m, *support.shape[3:])).reshape(b, k, m, -1)
        return self.encoder(feats)

    # ------------------------------------------------------------------ training

    def on_stage_end(self, stage: str, data, *, seed: int = 0) -> None:
        """After the VAE: standardize the latents the diffusion will learn (on up to 2,048 zoo models)."""
        if stage == "vae":
            rows = torch.randperm(len(data.ids), generator=torch.Generator().manual_seed(seed))[:2048]
            support = data.support(rows, self.support_per_class, torch.Generator().manual_seed(seed))
            dev = self.latent_std.device
            self.set_latent_scale(data.tokens[rows].to(dev), data.num_classes, support.to(dev))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raw_tokens = batch["tokens"]  # (B, T, C) standardized weight tokens
        layout = self.layout(batch["support"].shape[1])
        mask = layout.mask.to(raw_tokens.device)
        with torch.no_grad():
            tokens = self.to_residual(raw_tokens, batch["support"], layout)
        if batch.get("stage", "diffusion") == "vae":
            mu, logvar = self.vae.encode(tokens, layout)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            z = z + self.config.latent_noise * torch.randn_like(z)  # robust to imprecise diffusion samples
            recon = masked_mse(self.vae.decode(z, layout), tokens, mask)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
            return {"loss": recon + self.config.kl_weight * kl, "recon": recon, "kl": kl}
        with torch.no_grad():
            z0 = self.vae.encode(tokens, layout)[0] / self.latent_std
        cls_emb, ds_emb = self.embed(batch["support"])
        drop = torch.rand(tokens.shape[0], device=tokens.device) < self.config.p_uncond
        cls_emb = torch.where(drop[:, None, None], self.null_cls.expand_as(cls_emb), cls_emb)
        ds_emb = torch.where(drop[:, None], self.null_ds.expand_as(ds_emb), ds_emb)
        feats = None
        if self.config.feature_dim:
            # the head learns to sit on its backbone: condition class rows on the class's mean
            # penultimate feature under the true weights (dropped often, for backbone-free sampling)
            sd = decode_tokens(layout, raw_tokens, self.stats)
            feats = self.class_features(sd, batch["support"], layout)
            keep = torch.rand(tokens.shape[0], device=tokens.device) >= self.config.p_drop_features
            feats = feats * (keep & ~drop)[:, None, None]
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        pred = self.denoiser(zt, t, cls_emb, ds_emb, layout, feats)
        target = {"sample": z0, "epsilon": noise,
                  "v_prediction": self.noise_scheduler.get_velocity(z0, noise, t)}[self.config.prediction_type]
        err = (pred - target).pow(2).mean(-1)  # (B, T)
        is_cls = layout.cls.to(err.device) >= 0
        if is_cls.any() and (~is_cls).any() and self.config.head_loss_share:
            # a handful of class rows would otherwise be drowned by the backbone's many tokens,
            # yet they decide the accuracy: give them a fixed share of the loss
            s = self.config.head_loss_share
            loss = s * err[:, is_cls].mean() + (1 - s) * err[:, ~is_cls].mean()
            return {"loss": loss, "head": err[:, is_cls].mean().detach(), "backbone": err[:, ~is_cls].mean().detach()}
        return {"loss": err.mean()}

    @torch.no_grad()
    def _raw_features(self, sd, support, layout):
        from weightgen.evaluate import complete, penultimate_many

        c = self.config
        b, k, m = support.shape[:3]
        full = complete(c.arch, k, tuple(c.input_shape), sd, self._backbone)
        f = penultimate_many(c.arch, k, tuple(c.input_shape), full, support.reshape(b, k * m, *support.shape[3:]),
                             per_model_x=True)
        return f.reshape(b, k, m, -1).mean(2)  # (B, K, F)

    @torch.no_grad()
    def class_features(self, sd: dict[str, torch.Tensor], support: torch.Tensor, layout) -> torch.Tensor:
        """(B, K, F+1): each class's mean penultimate feature under each model's backbone, scaled to
        unit RMS per model, with the log of that scale appended (so magnitudes are not lost)."""
        f = self._raw_features(sd, support, layout)  # (B, K, F)
        k = f.shape[1]
        rms = f.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-6)
        return torch.cat([f / rms, rms.log().expand(-1, k, 1)], -1)

    _backbone = None  # head mode: the stored backbone's tensors (name -> tensor), set by the caller

    # --- weight imprinting (option, off by default): class rows as residuals from an imprinted head
    # Measured on held-out digit class sets (1,500 VAE + 750 diffusion steps): 74.5 % with it vs
    # ~82 % without; imprinting alone on the generated backbone gave 83.7 %. Trained heads are far
    # from s * h_i (residuals 2.3x the imprint's norm), so this prior needs a better form first.
    # Row i of the imprinted head is s * h_i with bias -s * |h_i|^2 / 2, h_i being class i's mean
    # penultimate feature on the support set: the nearest-class-mean rule in the backbone's own
    # feature space (Qi et al., "Low-shot learning with imprinted weights", 2018). It is a closed
    # form of the support set, like the set encoder, not an optimization on it. The diffusion
    # generates what trained heads add to it (discriminative corrections), which transfers to
    # class sets it never saw far better than generating raw rows.

    def _head_names(self, layout) -> tuple[str, str | None]:
        from weightgen.archs import get_arch

        cls_mod = get_arch(self.config.arch).classifier
        w = next(n for n in layout.keys if n.startswith(cls_mod) and n.endswith("weight") and len(layout.shapes[n]) == 2)
        b = w[: -len("weight")] + "bias"
        return w, b if b in layout.keys else None

    def imprint_tokens(self, sd, support, layout) -> torch.Tensor:
        """(B, T, C) standardized tokens of the imprinted head (zero on backbone tokens) — what the
        class-row tokens are residuals from."""
        h = self._raw_features(sd, support, layout)  # (B, K, F)
        s = self.imprint_scale
        wname, bname = self._head_names(layout)
        stats = self.stats.standardizer().stats
        imp = {wname: (s * h - stats[wname][0]) / stats[wname][1]}
        if bname:
            imp[bname] = (-0.5 * s * h.pow(2).sum(-1) - stats[bname][0]) / stats[bname][1]
        filler = {n: torch.zeros(h.shape[0], *layout.shapes[n], device=h.device) for n in layout.keys if n not in imp}
        tok = layout.tokenize({**filler, **imp})
        return tok * (layout.cls.to(tok.device) >= 0)[None, :, None]

    @torch.no_grad()
    def fit_imprint_scale(self, data, max_models: int = 256) -> float:
        """The global scale s that best maps class features to the zoo's trained rows (least squares)."""
        rows = torch.arange(min(len(data.ids), max_models))
        support = data.support(rows, self.support_per_class, torch.Generator().manual_seed(0))
        sd = {k: v[rows] for k, v in data.weights.items()}
        h = self._raw_features(sd, support, data.layout)
        w = sd[self._head_names(data.layout)[0]]
        self.imprint_scale.fill_(float((w * h).sum() / h.pow(2).sum().clamp_min(1e-12)))
        return float(self.imprint_scale)

    def to_residual(self, tokens, support, layout, sign: float = -1.0) -> torch.Tensor:
        """Class-row tokens minus (sign=-1) or plus (sign=+1) the imprint of the tokens' own backbone."""
        if not (self.config.imprint_head and self.config.feature_dim):
            return tokens
        sd = decode_tokens(layout, tokens, self.stats)
        return tokens + sign * self.imprint_tokens(sd, support, layout)

    @torch.no_grad()
    def set_latent_scale(self, tokens: torch.Tensor, num_classes: int, support: torch.Tensor | None = None) -> float:
        """Standardize latents before diffusion (their spread is whatever the VAE learned)."""
        layout = self.layout(num_classes)
        if support is not None:
            tokens = self.to_residual(tokens, support, layout)
        mu = self.vae.encode(tokens, layout)[0]
        self.latent_std.fill_(float(mu.std().clamp_min(1e-4)))
        return float(self.latent_std)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor, num_classes: int, support: torch.Tensor | None = None) -> torch.Tensor:
        """Autoencode standardized weight tokens (B, T, C); the imprinted head needs the support
        set (B, K, M, *input) the weights were trained for."""
        layout = self.layout(num_classes)
        if self.config.imprint_head and self.config.feature_dim:
            if support is None:
                raise ValueError("this D2NWG generates heads as residuals from imprinting: pass the support set")
            support = support.expand(tokens.shape[0], *support.shape[1:])
            res = self.to_residual(tokens, support, layout)
            rec = self.vae.decode(self.vae.encode(res, layout)[0], layout)
            back = decode_tokens(layout, rec, self.stats)  # backbone as reconstructed
            return rec + self.imprint_tokens(back, support, layout)
        return self.vae.decode(self.vae.encode(tokens, layout)[0], layout)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, cond: Condition, n: int, generator: torch.Generator | None = None,
               guidance: float | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        """n weight sets for ``cond`` -> stacked raw-scale state dict (name -> (n, ...))."""
        g = self.config.guidance if guidance is None else guidance
        k = cond.num_classes
        layout = self.layout(k)
        dev = self.latent_std.device
        cls_emb, ds_emb = self.embed(cond.support[None].to(dev, torch.float32))
        cls_emb, ds_emb = cls_emb.expand(n, -1, -1), ds_emb.expand(n, -1)
        null_cls, null_ds = self.null_cls.expand_as(cls_emb), self.null_ds.expand_as(ds_emb)
        steps = steps or self.config.sample_steps
        # phase 1: every token, conditioned on the support set
        z = self._denoise(torch.randn(n, layout.num_tokens, self.config.latent_dim, generator=generator).to(dev),
                          layout, steps, g, (cls_emb, ds_emb), (null_cls, null_ds), None)
        if self.config.feature_dim:
            # phase 2: keep the backbone, regenerate the class rows conditioned on the class features
            # that this backbone computes on the support set (RePaint-style: known tokens are
            # re-noised to each step's level, exactly what the denoiser saw in training)
            known = layout.cls.to(dev) < 0
            sd = decode_tokens(layout, self.vae.decode(z * self.latent_std, layout), self.stats)
            support = cond.support[None].expand(n, *cond.support.shape).to(dev)
            feats = self.class_features(sd, support, layout)
            z0 = z
            noise = torch.randn(z.shape, generator=generator).to(dev)
            z = self._denoise(torch.randn(z.shape, generator=generator).to(dev), layout, steps, g,
                              (cls_emb, ds_emb), (null_cls, null_ds), feats, known=(known, z0, noise))
        tokens = self.vae.decode(z * self.latent_std, layout)
        if self.config.imprint_head and self.config.feature_dim:
            support = cond.support[None].expand(n, *cond.support.shape).to(dev)
            tokens = tokens + self.imprint_tokens(decode_tokens(layout, tokens, self.stats), support, layout)
        return decode_tokens(layout, tokens, self.stats)

    def _ddim(self, steps: int) -> DDIMScheduler:
        """The sampling scheduler for ``steps``, built once (from_config costs ~3 ms, a third of a
        small request). DDIM's step() keeps no state between calls, so one is shared. Built from the
        training scheduler's config keys that DDIM takes, which is what ``from_config`` does, minus
        its import of every "compatible" scheduler module (scipy.stats among them: 0.7 s of a CLI run)."""
        cache = self.__dict__.setdefault("_ddim_cache", {})
        if steps not in cache:
            takes = inspect.signature(DDIMScheduler.__init__).parameters
            sched = DDIMScheduler(**{k: v for k, v in self.noise_scheduler.config.items() if k in takes})
            sched.set_timesteps(steps)
            cache[steps] = sched
        return cache[steps]

    def _denoise(self, z, layout, steps, g, cond, null, feats, known=None):
        """The DDIM loop (eta = 0: deterministic given the initial noise), with classifier-free
        guidance and, optionally, known tokens held at their noised true values.

        No class features reads as zeros, exactly as training dropped them (``feat_proj``'s bias
        included). For small n the guidance halves run as one batch of 2n (fewer, fuller calls:
        measured 15 % faster at n = 1 on CPU, but 10 % slower at n = 8). The choice depends on n
        alone, so the same request always runs the same shapes and gives the same bytes."""
        sched = self._ddim(steps)
        n = z.shape[0]
        if feats is None and self.denoiser.feat_proj is not None:
            feats = z.new_zeros(n, cond[0].shape[1], self.denoiser.feat_proj.in_features)
        no_feats = None if feats is None else torch.zeros_like(feats)
        joint = g != 1.0 and n <= JOINT_GUIDANCE_MAX_N
        if joint:
            both = (torch.cat([cond[0], null[0]]), torch.cat([cond[1], null[1]]))
            both_feats = None if feats is None else torch.cat([feats, no_feats])
        for t in sched.timesteps:
            tt = t.expand(n).to(z.device)
            if known is not None:
                mask, z0, noise = known
                z = torch.where(mask[None, :, None], self.noise_scheduler.add_noise(z0, noise, tt), z)
            if joint:
                pred, uncond = self.denoiser(torch.cat([z, z]), torch.cat([tt, tt]), *both, layout, both_feats).chunk(2)
            else:
                pred = self.denoiser(z, tt, *cond, layout, feats)
                uncond = self.denoiser(z, tt, *null, layout, no_feats) if g != 1.0 else None
            if uncond is not None:
                pred = uncond + g * (pred - uncond)
            z = sched.step(pred, t, z).prev_sample
        if known is not None:
            z = torch.where(known[0][None, :, None], known[1], z)
        return z


def _classifier_in_features(arch: str, num_classes: int, input_shape) -> int:
    from weightgen.archs import get_arch

    spec = get_arch(arch)
    w = next(t for t in spec.tensors(num_classes, input_shape) if t.name.startswith(spec.classifier) and t.name.endswith("weight") and len(t.shape) == 2)
    return w.shape[1]


register_preset("d2nwg-tiny", "d2nwg", latent_dim=16, vae_hidden=64, vae_depth=1, d_model=32, depth=1, heads=2,
                cond_dim=32, cond_depth=1, sample_steps=5)
register_preset("d2nwg-s", "d2nwg")
