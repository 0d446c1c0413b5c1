"""What every task shares: the deterministic data order, per-sample randomness, the model."""
from __future__ import annotations

import abc
import hashlib
from pathlib import Path

import torch
from torch import nn

from unimodal.config import ModelConfig, TrainConfig
from unimodal.model import ACDiT


def _seed(*parts: int) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def check_config(cfg, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 choices: dict[str, tuple] | None = None) -> None:
    """A task config's fields checked when it is made (overrides included): raises naming every bad one."""
    name = type(cfg).__name__
    bad = [f"task.{f} must be at least 1, got {getattr(cfg, f)}" for f in at_least_one if getattr(cfg, f) < 1]
    bad += [f"task.{f} must be 0 or more, got {getattr(cfg, f)}" for f in non_negative if getattr(cfg, f) < 0]
    bad += [f"task.{f} must be one of {c}, got {getattr(cfg, f)!r}" for f, c in (choices or {}).items()
            if getattr(cfg, f) not in c]
    if bad:
        raise ValueError(f"{name}: " + "; ".join(bad))


SCHEDULERS = ("dpm", "ddim", "ddpm")  # unimodal.diffusion.sampling_scheduler's
CODECS = ("pixel", "vae")


class Task(abc.ABC):
    """Base class. Subclasses implement `batch`, `loss`, `evaluate` and usually `preview`.

    Data order is a pure function of (seed, step): the global batch of step s is positions
    [s G, (s+1) G) of a stream of seeded per-epoch permutations, and rank r of W processes takes
    the r-th slice. Per-sample randomness (noise, timesteps, label drops, augmentation) comes
    from a generator seeded by (seed, step, position), so W processes draw exactly what one
    process would, and a resumed run continues exactly where it stopped. The exception is what mixes
    samples within a batch (classification's mixup and cutmix): each process mixes its own share, as
    timm does, so a run on W processes pairs other samples than a run on one.
    """

    # evaluate() runs on every process of a distributed launch, sharing the work out: process 0 returns the
    # metrics, the others {}. Otherwise process 0 alone evaluates.
    sharded_eval: bool = False

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, device="cpu"):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device)
        if cfg.global_batch % world:
            raise ValueError(f"global_batch {cfg.global_batch} is not divisible by {world} processes")
        self.local_batch = cfg.global_batch // world
        self._perms: dict[int, torch.Tensor] = {}

    # -------------------------------------------------------------- model
    def model_config(self) -> ModelConfig:
        return self.cfg.model

    def build_model(self) -> nn.Module:
        return ACDiT(self.model_config())

    # -------------------------------------------------------------- data order
    @abc.abstractmethod
    def dataset_size(self) -> int:
        """How many training examples the task draws from."""

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch))
            self._perms[epoch] = torch.randperm(self.dataset_size(), generator=g)
        return self._perms[epoch]

    def positions(self, step: int) -> list[int]:
        """Global stream positions of this rank's share of the step's batch."""
        start = step * self.cfg.global_batch + self.rank * self.local_batch
        return list(range(start, start + self.local_batch))

    def indices(self, step: int) -> tuple[list[int], list[int]]:
        """(dataset indices, stream positions) of this rank's share of the step's batch."""
        n = self.dataset_size()
        pos = self.positions(step)
        return [int(self._perm(p // n)[p % n]) for p in pos], pos

    def generators(self, step: int, positions: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(_seed(self.cfg.seed, 1, step, p)) for p in positions]

    # -------------------------------------------------------------- hooks
    @abc.abstractmethod
    def batch(self, step: int):
        """This rank's share of the global batch of `step`, on the task's device."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, {name: detached scalar} to log)."""

    def evaluate(self, model: nn.Module, out_dir: Path, quick: bool = False) -> dict:
        return {}

    def preview(self, model: nn.Module, out_dir: Path, step: int) -> list[Path]:
        return []
