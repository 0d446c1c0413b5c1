"""Per-block timesteps, noising, the training loss and scheduler construction (diffusers).

Training noises every block with its own t ~ U{0..999} through diffusers' DDPMScheduler
(1000 steps, linear betas, as the reference) and regresses epsilon; text positions are
trained with next-token cross-entropy. total = text_weight * CE + image_weight * MSE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from .model import ACDiT, ModelInput
from .sequence import IGNORE, TEXT, Packed


def train_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=0.0001, beta_end=0.02)


def sampling_scheduler(kind: str = "dpm", num_train_timesteps: int = 1000):
    """Sampling scheduler built from the DDIM config as the reference does ("dpm"), or DDIM / DDPM."""
    base = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=0.0001, beta_end=0.02)
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


def block_labels(packed: Packed, null_class: int, dropout: float, generator: torch.Generator | None) -> Tensor:
    """(n_blocks,) labels with absent labels and dropped samples mapped to the null class; the
    drop is drawn once per sample so that all blocks of a sample agree."""
    y = packed.block_label.clone()
    if dropout > 0 and y.numel():
        drop = torch.rand(packed.n_samples, generator=generator) < dropout  # (n_samples,)
        y = torch.where(drop.to(y.device)[packed.block_sample], torch.full_like(y, -1), y)
    return torch.where(y < 0, torch.full_like(y, null_class), y)


def model_input(packed: Packed, patches: Tensor, t: Tensor, y: Tensor) -> ModelInput:
    """Training input: noised tokens are conditioned on their block's (t, y)."""
    cond_index = torch.where(packed.noisy.bool(), packed.block_id, torch.full_like(packed.block_id, -1))
    return ModelInput(packed.tokens, patches, packed.kind == TEXT, packed.layout, packed.pos, cond_index, t, y)


def noise_blocks(packed: Packed, scheduler: DDPMScheduler, t: Tensor, generator: torch.Generator | None):
    """Noise the noised copy of every block at its own timestep. Returns (patches, eps) (B, L, P)."""
    x0 = packed.patches  # (B, L, P)
    eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)  # (B, L, P)
    noisy = packed.noisy.bool()  # (B, L)
    bid = packed.block_id.clamp(min=0)  # (B, L)
    alphas = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    ab = alphas[t.long()][bid]  # (B, L)
    xt = ab.sqrt()[..., None] * x0 + (1 - ab).sqrt()[..., None] * eps  # (B, L, P)
    patches = torch.where(noisy[..., None], xt.to(x0.dtype), x0)  # (B, L, P)
    return patches, eps


def training_loss(model: ACDiT, packed: Packed, scheduler: DDPMScheduler, cfg: LossConfig,
                  generator: torch.Generator | None = None, t: Tensor | None = None) -> tuple[Tensor, dict]:
    """One training forward. Returns (total loss, {"text": ce, "image": mse}) with detached parts."""
    device = packed.tokens.device
    nb = packed.n_blocks
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (nb,), generator=generator).to(device)
    y = block_labels(packed, model.null_class, cfg.class_dropout if model.training else 0.0, generator)
    patches, eps = noise_blocks(packed, scheduler, t, generator)
    text_sel = packed.text_target != IGNORE  # (B, L)
    out = model(model_input(packed, patches, t, y), logits_at=text_sel)
    total = torch.zeros((), device=device)
    parts: dict[str, Tensor] = {}
    noisy = packed.noisy.bool()
    if noisy.any():
        mse = F.mse_loss(out.eps[noisy].float(), eps[noisy].float())
        total = total + cfg.image_weight * mse
        parts["image"] = mse.detach()
    if out.logits is not None and out.logits.shape[0] > 0:
        ce = F.cross_entropy(out.logits.float(), packed.text_target[text_sel])
        total = total + cfg.text_weight * ce
        parts["text"] = ce.detach()
    return total, parts
