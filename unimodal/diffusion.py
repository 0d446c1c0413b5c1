"""Per-block timesteps, noising, the training loss and scheduler construction (diffusers).

Training noises every block with its own t ~ U{0..999} through diffusers' DDPMScheduler
(1000 steps, linear betas, as the reference) and regresses epsilon; text positions are
trained with next-token cross-entropy. total = text_weight * CE + image_weight * MSE, where the
MSE may weight each block by min(SNR(t), gamma) / SNR(t) (Min-SNR-gamma, Hang et al. 2023; off by
default, as in the paper), which shifts the effort from nearly clean blocks to the high-noise
ones that decide a sample's global shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor

from .model import ACDiT, ModelInput
from .sequence import IGNORE, TEXT, Packed


def train_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=0.0001, beta_end=0.02)


def sampling_scheduler(kind: str = "dpm", num_train_timesteps: int = 1000):
    """Sampling scheduler built from the DDIM config as the reference does ("dpm"), or DDIM / DDPM; none clips
    its x0 estimates to [-1, 1] (diffusers' DDIM default): latents are not bounded (DiT, ACDiT do not clip)."""
    base = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=0.0001, beta_end=0.02, clip_sample=False)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(base.config)
    if kind == "ddim":
        return base
    if kind == "ddpm":
        return DDPMScheduler.from_config(base.config)
    raise ValueError(f"unknown sampling scheduler {kind!r}; choose dpm, ddim or ddpm")


@dataclass
class LossConfig:
    text_weight: float = 1.0
    image_weight: float = 1.0
    class_dropout: float = 0.1  # probability of replacing a sample's label with the null class
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma weight min(SNR, gamma) / SNR per block (epsilon loss)


@dataclass
class Draws:
    """The randomness of one training step: per-block timesteps, per-sample label drops, noise."""
    t: Tensor  # (n_blocks,) long
    drop: Tensor  # (n_samples,) bool
    eps: Tensor  # (B, L, P)


def draw(packed: Packed, num_train_timesteps: int, dropout: float,
         generators: list[torch.Generator] | torch.Generator | None = None) -> Draws:
    """Draw t ~ U{0..T-1} per block, a label drop per sample and eps per noised token.
    With one generator per sample, each sample's draws depend only on its own generator, so a
    batch split across processes draws exactly what one process would."""
    B, L, P = packed.patches.shape
    if not isinstance(generators, list):
        t = torch.randint(0, num_train_timesteps, (packed.n_blocks,), generator=generators)
        drop = torch.rand(packed.n_samples, generator=generators) < dropout
        eps = torch.randn((B, L, P), generator=generators)
        return Draws(t, drop, eps)
    if len(generators) != packed.n_samples:
        raise ValueError(f"{len(generators)} generators for {packed.n_samples} samples")
    t = torch.zeros(packed.n_blocks, dtype=torch.long)
    drop = torch.zeros(packed.n_samples, dtype=torch.bool)
    eps = torch.zeros(B, L, P)
    for i, g in enumerate(generators):
        blocks = torch.nonzero(packed.block_sample == i).flatten()
        t[blocks] = torch.randint(0, num_train_timesteps, (len(blocks),), generator=g)
        drop[i] = bool(torch.rand((), generator=g) < dropout)
        for rec in packed.segments_of(i):
            if rec.noisy_idx is not None:
                eps[rec.row, rec.noisy_idx] = torch.randn((len(rec.noisy_idx), P), generator=g)
    return Draws(t, drop, eps)


def block_labels(packed: Packed, null_class: int, drop: Tensor | None = None) -> Tensor:
    """(n_blocks,) labels with absent labels and dropped samples mapped to the null class."""
    y = packed.block_label.clone()
    if drop is not None and y.numel():
        y = torch.where(drop.to(y.device)[packed.block_sample], torch.full_like(y, -1), y)
    return torch.where(y < 0, torch.full_like(y, null_class), y)


def model_input(packed: Packed, patches: Tensor, t: Tensor, y: Tensor) -> ModelInput:
    """Training input: noised tokens are conditioned on their block's (t, y)."""
    cond_index = torch.where(packed.noisy.bool(), packed.block_id, torch.full_like(packed.block_id, -1))
    return ModelInput(packed.tokens, patches, packed.kind == TEXT, packed.layout, packed.pos, cond_index, t, y)


def noise_blocks(packed: Packed, scheduler: DDPMScheduler, t: Tensor, eps: Tensor) -> Tensor:
    """Noise the noised copy of every block at its own timestep: patches (B, L, P)."""
    x0 = packed.patches  # (B, L, P)
    eps = eps.to(x0.device, x0.dtype)  # (B, L, P)
    noisy = packed.noisy.bool()  # (B, L)
    bid = packed.block_id.clamp(min=0)  # (B, L)
    alphas = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    ab = alphas[t.long()][bid]  # (B, L)
    xt = ab.sqrt()[..., None] * x0 + (1 - ab).sqrt()[..., None] * eps  # (B, L, P)
    return torch.where(noisy[..., None], xt.to(x0.dtype), x0)  # (B, L, P)


def training_loss(model: ACDiT, packed: Packed, scheduler: DDPMScheduler, cfg: LossConfig,
                  generator: list[torch.Generator] | torch.Generator | None = None,
                  t: Tensor | None = None, draws: Draws | None = None) -> tuple[Tensor, dict]:
    """One training forward. Returns (total loss, {"text": ce, "image": mse}) with detached parts.
    Randomness comes from `draws`, else from `generator` (one, or one per sample); `t` fixes the
    timesteps."""
    device = packed.tokens.device
    if draws is None:
        draws = draw(packed, scheduler.config.num_train_timesteps,
                     cfg.class_dropout if model.training else 0.0, generator)
    if t is not None:
        draws = Draws(t.cpu(), draws.drop, draws.eps)
    t = draws.t.to(device)
    y = block_labels(packed, getattr(model, "module", model).null_class, draws.drop)
    eps = draws.eps.to(device)
    patches = noise_blocks(packed, scheduler, t, eps)
    text_sel = packed.text_target != IGNORE  # (B, L)
    out = model(model_input(packed, patches, t, y), logits_at=text_sel)
    total = torch.zeros((), device=device)
    parts: dict[str, Tensor] = {}
    noisy = packed.noisy.bool()
    if noisy.any():
        err = (out.eps[noisy].float() - eps[noisy].float()).square().mean(-1)  # (N_noisy,)
        if cfg.snr_gamma > 0:
            snr = compute_snr(scheduler, t)  # (n_blocks,)
            w = snr.clamp(max=cfg.snr_gamma) / snr  # (n_blocks,)
            err = err * w[packed.block_id[noisy]]  # (N_noisy,)
        mse = err.mean()
        total = total + cfg.image_weight * mse
        parts["image"] = mse.detach()
    if out.logits is not None and out.logits.shape[0] > 0:
        ce = F.cross_entropy(out.logits.float(), packed.text_target[text_sel])
        total = total + cfg.text_weight * ce
        parts["text"] = ce.detach()
    return total, parts
