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

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from weightgen.encoders import FEATURES, DatasetEncoder
from weightgen.generators import Condition, register_generator, register_preset
from weightgen.generators.common import TokenIds, WeightStats, decode_tokens, layout_for, masked_mse


def mlp(i: int, h: int, o: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(i, h), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(h, h), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(h, o))


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

    def __init__(self, latent_dim, d_model, depth, heads, cond_dim, num_modules, max_slot):
        super().__init__()
        self.inp = nn.Linear(latent_dim, d_model)
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

    def forward(self, z, t, cls_emb, ds_emb, layout):
        """z (B, T, Z); t (B,); cls_emb (B, K, Dc); ds_emb (B, Dc) -> prediction (B, T, Z)."""
        b, n_tok, _ = z.shape
        temb = self.time_emb(self.time_proj(t).to(z.dtype))  # (B, D)
        cls = self.cond_proj(cls_emb)  # (B, K, D)
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
class D2NWG(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, arch: str = "mlp-s", input_shape: tuple = (64,), train_num_classes: int = 5, mode: str = "full",
                 token_dim: int = 65, num_modules: int = 2, max_slot: int = 32, feature: str = "raw",
                 stat_names: tuple = (), latent_dim: int = 32, vae_hidden: int = 256, vae_depth: int = 2,
                 kl_weight: float = 1e-4, latent_noise: float = 0.05, d_model: int = 128, depth: int = 4,
                 heads: int = 4, cond_dim: int = 128, cond_depth: int = 2, p_uncond: float = 0.1,
                 prediction_type: str = "sample", num_train_timesteps: int = 1000, sample_steps: int = 25,
                 guidance: float = 1.5, support_per_class: int = 10, latent_scale: float = 1.0):
        super().__init__()
        self.features = FEATURES.get(feature)(tuple(input_shape))
        self.stats = WeightStats(arch, train_num_classes, tuple(input_shape), list(stat_names))
        self.vae = TokenVAE(token_dim, latent_dim, vae_hidden, vae_depth, num_modules, max_slot)
        self.encoder = DatasetEncoder(self.features.dim, cond_dim, cond_depth)
        self.denoiser = Denoiser(latent_dim, d_model, depth, heads, cond_dim, num_modules, max_slot)
        self.null_cls = nn.Parameter(torch.zeros(cond_dim))
        self.null_ds = nn.Parameter(torch.zeros(cond_dim))
        self.register_buffer("latent_std", torch.tensor(float(latent_scale)))
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                             beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_zoo(cls, data, **config) -> "D2NWG":
        lay = data.layout
        model = cls(arch=data.arch, input_shape=tuple(data.input_shape), train_num_classes=data.num_classes,
                    mode=data.mode, token_dim=lay.token_dim, num_modules=len(lay.modules),
                    max_slot=int(lay.slot.max()) + 1, stat_names=tuple(lay.keys), **config)
        model.stats.set(data.standardizer, data.align_ref)
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

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # so DDP wrappers see the training step
        return self.loss(batch)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]  # (B, T, C) standardized weight tokens
        layout = self.layout(batch["support"].shape[1])
        mask = layout.mask.to(tokens.device)
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
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        pred = self.denoiser(zt, t, cls_emb, ds_emb, layout)
        target = {"sample": z0, "epsilon": noise,
                  "v_prediction": self.noise_scheduler.get_velocity(z0, noise, t)}[self.config.prediction_type]
        return {"loss": F.mse_loss(pred, target)}

    @torch.no_grad()
    def set_latent_scale(self, tokens: torch.Tensor, num_classes: int) -> float:
        """Standardize latents before diffusion (their spread is whatever the VAE learned)."""
        mu = self.vae.encode(tokens, self.layout(num_classes))[0]
        self.latent_std.fill_(float(mu.std().clamp_min(1e-4)))
        return float(self.latent_std)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
        layout = self.layout(num_classes)
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
        sched = DDIMScheduler.from_config(self.noise_scheduler.config)
        sched.set_timesteps(steps or self.config.sample_steps)
        z = torch.randn(n, layout.num_tokens, self.config.latent_dim, generator=generator).to(dev)
        for t in sched.timesteps:
            tt = t.expand(n).to(dev)
            pred = self.denoiser(z, tt, cls_emb, ds_emb, layout)
            if g != 1.0:
                uncond = self.denoiser(z, tt, null_cls, null_ds, layout)
                pred = uncond + g * (pred - uncond)
            z = sched.step(pred, t, z).prev_sample  # eta = 0: deterministic given the initial noise
        tokens = self.vae.decode(z * self.latent_std, layout)
        return decode_tokens(layout, tokens, self.stats)


register_preset("d2nwg-tiny", "d2nwg", latent_dim=16, vae_hidden=64, vae_depth=1, d_model=32, depth=1, heads=2,
                cond_dim=32, cond_depth=1, sample_steps=5)
register_preset("d2nwg-s", "d2nwg")
