"""Linear probing of a pretrained ACDiT (MAE's protocol): a frozen backbone, and a
BatchNorm(affine=False) + linear head trained on its pooled clean-block features.

Features are those of tasks/classify.py (clean blocks only, mean of the final normalised hidden
states, or of block `feature_layer`). The backbone never changes, so the features of the train
and test sets are computed once, with no augmentation, kept in memory, and the head is trained
on them: a step costs a matrix product. The head is trained by train.py's AdamW (MAE uses LARS
with lr 0.1 x batch/256; with BatchNorm in front, AdamW at a large lr and no weight decay is the
plain substitute used here).

Under DDP each process extracts a contiguous share of a split and all receive the whole; the head's
BatchNorm normalises each process's share of a batch (a plain BatchNorm1d: SyncBatchNorm has no CPU
kernel), so W processes train nearly, not exactly, the head of one.

Memory: N x hidden floats per split (ImageNet train with ACDiT-L: 1.28M x 1024 x 4 B = 5.2 GB).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from unimodal import shards
from unimodal.config import resolve_precision

from .base import CODECS, check_config
from .classify import Classifier, ClassifyTask, top_k


@dataclass
class LinearProbeConfig:
    dataset: str = "mnist"  # mnist | an ImageFolder / HF dataset path | a latent cache directory
    test_dataset: str = ""  # default: `dataset` at split `test_split`
    test_split: str = "test"  # "val" for ImageNet
    image_size: int = 32
    num_classes: int = 10
    codec: str = "pixel"  # pixel | vae
    vae_path: str = ""
    block: int = 64  # patches per block, as in pretraining
    train_limit: int = 0  # use the first n training examples (0 = all)
    test_limit: int = 0  # evaluate on the first n test examples (0 = all)
    feature_layer: int = 0  # 0: final normalised hidden states; k: output of block k (1..depth)
    pool: str = "all"  # all: mean over every block; context: all but the last (never trained as context)
    head_init_std: float = 0.01  # MAE linear probe: trunc_normal(std=0.01)
    label_smoothing: float = 0.0
    eval_batch: int = 256  # images per forward pass when computing features

    def __post_init__(self) -> None:
        check_config(self, ("image_size", "num_classes", "block", "eval_batch"),
                     ("train_limit", "test_limit", "feature_layer", "head_init_std", "label_smoothing"),
                     {"codec": CODECS, "pool": ("all", "context")})


class LinearProbeTask(ClassifyTask):
    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        self._features: dict[str, tuple[Tensor, Tensor]] = {}

    def build_model(self) -> nn.Module:
        t = self.tc
        return Classifier(self.model_config(), t.num_classes, t.feature_layer, t.head_init_std, probe=True, pool=t.pool)

    @torch.no_grad()
    def extract(self, model, split: str) -> tuple[Tensor, Tensor]:
        """(features (N, H) float32, labels (N,)) of a whole split under the frozen backbone, in
        the run's precision (bf16 autocast or fp32) for train and test alike. The processes of a
        distributed run each extract a contiguous share and all receive the whole."""
        base = getattr(model, "module", model)
        was = base.training
        base.eval()
        bf16 = resolve_precision(self.cfg.precision, self.device) == "bf16"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        n, bs = self.split_size(split), self.tc.eval_batch
        mine = shards.shard(n)
        feats = [torch.zeros(0, self.model_config().hidden_size, device=self.device)]
        labels = [torch.zeros(0, dtype=torch.long, device=self.device)]
        for s in tqdm(range(mine.start, mine.stop, bs), desc=f"{split} features", leave=False, disable=n <= bs):
            z, y = self.latents(split, list(range(s, min(mine.stop, s + bs))))
            with autocast:
                feats.append(base.features(self.inputs(z)).float())  # (b, H)
            labels.append(y)
        base.train(was)
        return shards.gather_rows(torch.cat(feats), n), shards.gather_rows(torch.cat(labels), n)

    def features(self, model, split: str) -> tuple[Tensor, Tensor]:
        """The cached features of a split, computed on first use."""
        if split not in self._features:
            self._features[split] = self.extract(model, split)
        return self._features[split]

    def batch(self, step: int) -> Tensor:
        idx, _ = self.indices(step)
        return torch.tensor(idx)  # rows of the cached train features

    def loss(self, model, batch: Tensor):
        feats, labels = self.features(model, "train")
        idx = batch.to(feats.device)
        logits = model(feats[idx]).float()  # (N, K)
        loss = F.cross_entropy(logits, labels[idx], label_smoothing=self.tc.label_smoothing)
        return loss, {"ce": loss.detach()}

    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.eval()
        feats, y = self.features(model, "test")
        if shards.rank_world()[0] != 0:
            return {}
        rows = torch.from_numpy(self.eval_rows("test", quick)).to(feats.device)
        feats, y = feats[rows], y[rows]
        with torch.no_grad():
            logits = model(feats).float()  # (N, K)
        metrics = {"top1": top_k(logits, y, 1), "top5": top_k(logits, y, 5),
                   "test_loss": float(F.cross_entropy(logits, y)), "examples": int(y.numel())}
        if "train" in self._features:
            tf, ty = self._features["train"]
            with torch.no_grad():
                metrics["train_top1"] = top_k(model(tf).float(), ty, 1)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
