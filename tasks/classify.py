"""Image classification with a pretrained ACDiT: end-to-end fine-tuning (the MAE recipe).

ACDiT as an encoder: an image is fed as its CLEAN blocks only, one image segment and no noised
copy, so the skip-causal mask reduces to block-causal attention among the clean blocks, and no
token is modulated (clean tokens never see a timestep or a class). The representation is the
mean over the image tokens of the final normalised hidden states, or of the output of block
`feature_layer` (RMS-normalised without a learned scale).

Fine-tuning follows MAE's recipe: the backbone is initialised from a generator
checkpoint (`init_from`) and trained end to end with a linear head on the pooled features (zero
or tiny init, no extra norm: the features are already normalised), layer-wise lr decay
(`optim.layer_decay`), AdamW with warmup and weight decay, label smoothing and mixup / cutmix.
Mixing is done on the latents (pixels for MNIST, SD-VAE latents for ImageNet) and the loss is
lam * CE(y_a) + (1 - lam) * CE(y_b), which equals cross-entropy against the mixed, smoothed
soft targets of timm's Mixup. Evaluation: top-1 (and top-5) on the test split, metrics.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from unimodal import data as D
from unimodal import shards
from unimodal.codecs import PixelCodec, VAECodec
from unimodal.config import ModelConfig
from unimodal.masks import Layout
from unimodal.model import ACDiT, ModelInput
from unimodal.sequence import Image, PackSpec, lay_out, patchify_image

from .base import CODECS, Task, _seed, check_config


@dataclass
class ClassifyConfig:
    dataset: str = "mnist"  # mnist | an ImageFolder / HF dataset path | a latent cache directory
    test_dataset: str = ""  # default: `dataset` at split `test_split` (a latent cache needs its own)
    test_split: str = "test"  # "val" for ImageNet
    image_size: int = 32  # MNIST is zero-padded from 28
    num_classes: int = 10
    codec: str = "pixel"  # pixel | vae
    vae_path: str = ""  # a local diffusers AutoencoderKL directory (codec = vae)
    block: int = 64  # patches per block, as in pretraining
    train_limit: int = 0  # use the first n training examples (0 = all)
    test_limit: int = 0  # evaluate on the first n test examples (0 = all)
    feature_layer: int = 0  # 0: final normalised hidden states; k: output of block k (1..depth)
    pool: str = "all"  # all: mean over every block; context: all but the last block (see Classifier)
    head_init_std: float = 2e-5  # MAE: trunc_normal(std=2e-5); 0 = zero init
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) for mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) for cutmix; 0 = off
    mix_prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    hflip: bool = False  # random horizontal flips (off for digits)
    shift: int = 0  # random translation by up to this many latent pixels per axis (edges replicated)
    eval_batch: int = 256

    def __post_init__(self) -> None:
        check_config(self, ("image_size", "num_classes", "block", "eval_batch"),
                     ("train_limit", "test_limit", "feature_layer", "head_init_std", "label_smoothing", "mixup",
                      "cutmix", "mix_prob", "switch_prob", "shift"), {"codec": CODECS, "pool": ("all", "context")})


# ----------------------------------------------------------------------------- clean-block input

def clean_input(latents: Tensor, spec: PackSpec, block) -> ModelInput:
    """(N, C, H, W) latents -> a ModelInput of clean blocks only: each row one image segment cut
    into blocks of `block` patches, in the positions and units pretraining gave its clean copy;
    no noised copy and no conditioning row, so attention is block-causal and nothing is modulated."""
    lay = lay_out(Image(latents[0].cpu(), block=block), spec)  # the units and positions of one image
    nb, bs, P = lay.values.shape
    N, L, (_, _, kh, kw), dev = latents.shape[0], nb * bs, lay.grid, latents.device
    patches = torch.stack([patchify_image(z, spec.patch_size, kh, kw) for z in latents]).reshape(N, L, P)  # (N, L, P)
    step = lay.steps.repeat_interleave(bs).to(dev)[None].expand(N, L)  # (N, L)
    pos = lay.pos.reshape(1, L, -1).to(dev).expand(N, L, -1)  # (N, L, A)
    zeros = torch.zeros(N, L, dtype=torch.long, device=dev)
    return ModelInput(tokens=zeros, patches=patches, is_text=torch.zeros(N, L, dtype=torch.bool, device=dev),
                      layout=Layout(zeros, step, zeros), pos=pos, cond_index=zeros - 1,
                      t=torch.zeros(0, device=dev), y=torch.zeros(0, dtype=torch.long, device=dev))


def pack_spec(model: ModelConfig) -> PackSpec:
    """Positions as the backbone was trained with: 3-axis M-RoPE, or the reference's 2-axis (h, w)."""
    return PackSpec(patch_size=model.patch_size, latent_channels=model.latent_channels,
                    positions="mrope" if model.rope_axes == 3 else "reference")


# ----------------------------------------------------------------------------- the model

class Classifier(nn.Module):
    """An ACDiT backbone read as an image encoder and a linear head on its pooled clean features.

    probe=True is MAE's linear probe: the backbone is frozen (no grad, always in eval mode) and a
    BatchNorm without affine parameters sits before the head. forward takes a clean ModelInput,
    or precomputed (N, H) features. Parameters under the backbone keep ACDiT's names behind a
    `backbone.` prefix, so `blocks.N.` drives train.py's layer-wise lr decay."""

    def __init__(self, cfg: ModelConfig, num_classes: int, feature_layer: int = 0, head_init_std: float = 2e-5,
                 probe: bool = False, pool: str = "all"):
        super().__init__()
        if not 0 <= feature_layer <= cfg.depth:
            raise ValueError(f"feature_layer must be 0 (final) or a block in 1..{cfg.depth}, got {feature_layer}")
        if pool not in ("all", "context"):
            raise ValueError(f"pool must be 'all' or 'context', got {pool!r}")
        self.pool = pool
        self.backbone = ACDiT(cfg)
        self.feature_layer, self.probe = feature_layer, probe
        H = cfg.hidden_size
        self.norm = nn.BatchNorm1d(H, affine=False, eps=1e-6) if probe else nn.Identity()
        self.head = nn.Linear(H, num_classes)
        if head_init_std > 0:
            nn.init.trunc_normal_(self.head.weight, std=head_init_std, a=-2 * head_init_std, b=2 * head_init_std)
        else:
            nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if probe:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.probe:
            self.backbone.eval()
        return self

    def features(self, inp: ModelInput) -> Tensor:
        """(N, H): the mean over image tokens of the chosen layer's hidden states. pool="context"
        leaves out the last block: image pretraining never uses the clean copy of an image's last
        block (nothing attends to it), so its features are the ones pretraining did not shape."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.probe):
            if self.feature_layer == 0:
                h = self.backbone(inp, return_hidden=True).hidden  # (N, L, H)
            else:
                got = {}
                hook = self.backbone.blocks[self.feature_layer - 1].register_forward_hook(
                    lambda mod, args, out: got.__setitem__("x", out))
                try:
                    self.backbone(inp)
                finally:
                    hook.remove()
                h = F.rms_norm(got["x"], (got["x"].shape[-1],), eps=self.backbone.cfg.norm_eps)  # (N, L, H)
            keep = inp.layout.doc >= 0  # (N, L)
            if self.pool == "context":
                step = inp.layout.step.masked_fill(~keep, -1)  # (N, L)
                keep = keep & (step < step.max(1, keepdim=True).values)  # (N, L)
                if not bool(keep.any(1).all()):
                    raise ValueError("pool='context' needs images of at least two blocks")
            keep = keep[..., None].to(h.dtype)  # (N, L, 1)
            return (h * keep).sum(1) / keep.sum(1)  # (N, H)

    def forward(self, x: ModelInput | Tensor) -> Tensor:
        f = x if isinstance(x, Tensor) else self.features(x)  # (N, H)
        return self.head(self.norm(f))  # (N, num_classes)

    def load_backbone(self, state_dict: dict, strict: bool = False):
        """Load ACDiT weights into the backbone: a generator checkpoint, or a Classifier's own
        (`backbone.*`, its head ignored). Returns (missing, unexpected) backbone keys; raises when
        no key matches at all (a wrong checkpoint must not silently leave a random backbone)."""
        pre = "backbone."
        if any(k.startswith(pre) for k in state_dict):
            state_dict = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
        own = self.backbone.state_dict()
        if not any(k in own for k in state_dict):
            raise ValueError(f"none of the {len(state_dict)} checkpoint keys is an ACDiT parameter "
                             f"(e.g. {sorted(state_dict)[:3]}); expected names like {sorted(own)[:3]}")
        return self.backbone.load_state_dict(state_dict, strict=strict)


# ----------------------------------------------------------------------------- augmentation

def shift(x: Tensor, rng: np.random.Generator, max_shift: int) -> Tensor:
    """Translate each (C, H, W) image of x (N, C, H, W) by integers drawn uniformly from
    [-max_shift, max_shift] per axis; pixels moved in from outside repeat the edge (the
    background of a digit), so a digit moves and nothing wraps around."""
    if max_shift <= 0:
        return x
    N, _, H, W = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")  # (N, C, H + 2s, W + 2s)
    off = rng.integers(0, 2 * s + 1, size=(N, 2))
    return torch.stack([padded[i, :, a:a + H, b:b + W] for i, (a, b) in enumerate(off.tolist())])  # (N, C, H, W)


# ----------------------------------------------------------------------------- mixup / cutmix

def mix(x: Tensor, y: Tensor, rng: np.random.Generator, mixup: float, cutmix: float, prob: float = 1.0,
        switch_prob: float = 0.5) -> tuple[Tensor, Tensor, float]:
    """timm's batch-mode Mixup on (N, C, H, W): with probability `prob`, mix every example with
    the batch reversed, by mixup (a convex blend) or cutmix (a box pasted in, lam corrected to the
    box's true area), cutmix chosen with `switch_prob` when both are on. -> (x, y_b, lam): the
    target is lam * y + (1 - lam) * y_b."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= prob:
        return x, y, 1.0
    use_cut = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cut else rng.beta(mixup, mixup))
    xb = x.flip(0)
    if use_cut:
        H, W = x.shape[-2:]
        r = np.sqrt(1 - lam)
        ch, cw = int(H * r), int(W * r)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
        x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
        x = x.clone()
        x[..., y1:y2, x1:x2] = xb[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
    else:
        x = lam * x + (1 - lam) * xb
    return x, y.flip(0), float(lam)


# ----------------------------------------------------------------------------- the task

@dataclass
class ClassBatch:
    inp: ModelInput
    y: Tensor  # (N,) long
    y_b: Tensor  # (N,) long, the partner labels of mixing
    lam: float

    @property
    def doc(self) -> Tensor:  # train.py counts tokens per second from it
        return self.inp.layout.doc


def top_k(logits: Tensor, y: Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, -1).indices == y[:, None]).any(-1).float().mean())


class ClassifyTask(Task):
    """End-to-end fine-tuning. Also the data side (examples -> latents -> clean input) of the
    linear probe, which subclasses it."""
    sharded_eval = True

    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        t = self.tc = cfg.task
        if t.codec not in ("pixel", "vae"):
            raise ValueError(f"task.codec must be 'pixel' or 'vae', got {t.codec!r}")
        self.spec = pack_spec(cfg.model)
        self._codec = None
        self._splits: dict = {}

    def build_model(self) -> nn.Module:
        t = self.tc
        return Classifier(self.model_config(), t.num_classes, t.feature_layer, t.head_init_std, pool=t.pool)

    # -------------------------------------------------------------- data
    @property
    def codec(self):
        """Built on first use: a latent cache never needs the VAE."""
        if self._codec is None:
            self._codec = PixelCodec(channels=self.cfg.model.latent_channels) if self.tc.codec == "pixel" \
                else VAECodec(self.tc.vae_path, device=self.device)
        return self._codec

    def _load(self, split: str):
        """('array', uint8 images, labels) or ('dataset', rows, None) for "train" / "test"."""
        if split not in self._splits:
            t = self.tc
            limit = t.train_limit if split == "train" else t.test_limit
            name = t.dataset if split == "train" else (t.test_dataset or t.dataset)
            if name == "mnist":
                x, y = D.mnist_arrays("train" if split == "train" else "test")
                x, y = (x[:limit], y[:limit]) if limit else (x, y)
                x = D._pad(x, t.image_size) if t.image_size != 28 else x
                self._splits[split] = ("array", torch.from_numpy(x), torch.from_numpy(y))
            else:
                ds_split = "train" if split == "train" else t.test_split
                if split != "train" and Path(name, "meta.json").exists() and Path(name).resolve() == Path(t.dataset).resolve():
                    raise D.DataError(f"task.dataset {t.dataset} is a latent cache, which holds one split: set "
                                      f"task.test_dataset to a latent cache of the {t.test_split} split")
                if Path(name, "meta.json").exists():
                    D.check_latent_cache(name, latent_channels=self.cfg.model.latent_channels)
                ds = D.build_dataset(name, ds_split, **({} if Path(name, "meta.json").exists() else {"size": t.image_size}))
                if split != "train":
                    self._check_held_out(name, ds)
                if limit:
                    ds = ds.select(range(min(limit, len(ds))))
                self._splits[split] = ("dataset", ds, None)
        return self._splits[split]

    def _check_held_out(self, name: str, test) -> None:
        """Refuses a test set that shares images with the training set (an ImageFolder root without a
        <test_split> folder is read whole as the test split)."""
        t = self.tc
        fix = f"set task.test_dataset to the {t.test_split} images (a folder of their own)"
        train = self._load("train")
        if train[0] == "dataset" and "path" in train[1].column_names and "path" in test.column_names:
            shared = set(train[1]["path"]) & set(test["path"])
            if shared:
                raise D.DataError(f"the test set ({name}, split {t.test_split!r}) has {len(shared)} of its "
                                  f"{len(test)} images in the training set ({t.dataset}), e.g. {sorted(shared)[0]}; {fix}")

    def dataset_size(self) -> int:
        return len(self._load("train")[1])

    def split_size(self, split: str) -> int:
        return len(self._load(split)[1])

    @torch.no_grad()
    def latents(self, split: str, idx: list[int], flip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Examples `idx` of a split -> (latents (N, c, h, w) on the device, labels (N,)). `flip` (N,)
        bool flips images before encoding; for a latent cache it takes the cached flipped latents,
        or flips the latents when none are cached."""
        x, y, is_latent = D.flipped_examples(*self._load(split), idx, flip)
        z = x.to(self.device) if is_latent else self.codec.encode(D.image_batch(x).to(self.device)).float()
        return z, y.long().to(self.device)

    def inputs(self, latents: Tensor) -> ModelInput:
        return clean_input(latents, self.spec, self.tc.block)

    # -------------------------------------------------------------- training
    def batch(self, step: int) -> ClassBatch:
        t = self.tc
        idx, pos = self.indices(step)
        flip = None
        if t.hflip:
            flip = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in self.generators(step, pos)])
        z, y = self.latents("train", idx, flip)
        rng = np.random.default_rng(_seed(self.cfg.seed, 2, step, self.rank))
        z = shift(z, rng, t.shift)
        z, y_b, lam = mix(z, y, rng, t.mixup, t.cutmix, t.mix_prob, t.switch_prob)
        return ClassBatch(self.inputs(z), y, y_b, lam)

    def loss(self, model, batch: ClassBatch):
        logits = model(batch.inp).float()  # (N, K)
        ls = self.tc.label_smoothing
        loss = F.cross_entropy(logits, batch.y, label_smoothing=ls)
        if batch.lam < 1.0:
            loss = batch.lam * loss + (1 - batch.lam) * F.cross_entropy(logits, batch.y_b, label_smoothing=ls)
        return loss, {"ce": loss.detach()}

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, model, split: str, rows) -> tuple[Tensor, Tensor]:
        """(logits (N, K), labels (N,)) of examples `rows` of a split, on the task's device."""
        rows = [int(r) for r in rows]
        logits, labels = [], []
        bs = self.tc.eval_batch
        for s in tqdm(range(0, len(rows), bs), desc=f"{split} top-1", leave=False, disable=len(rows) <= bs):
            z, y = self.latents(split, rows[s:s + bs])
            logits.append(model(self.inputs(z)).float())  # (b, K)
            labels.append(y)
        if not logits:  # a process whose share is empty
            return torch.zeros(0, self.tc.num_classes, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(logits), torch.cat(labels)

    def eval_rows(self, split: str, quick: bool) -> np.ndarray:
        """The examples an evaluation reads: all, or (quick) 1000 in a fixed random draw (a class-sorted split's
        first rows would cover a few classes)."""
        n = self.split_size(split)
        return np.sort(np.random.default_rng(0).permutation(n)[:1000]) if quick and n > 1000 else np.arange(n)

    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        out_dir = Path(out_dir)
        model.eval()
        rows = self.eval_rows("test", quick)
        share = shards.shard(len(rows))
        mine = rows[share.start:share.stop]  # this process's share
        logits, y = self.predict(model, "test", mine)
        logits, y = shards.gather_rows(logits, len(rows)), shards.gather_rows(y, len(rows))
        if shards.rank_world()[0] != 0:
            return {}
        logits, y = logits.cpu(), y.cpu()
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"top1": top_k(logits, y, 1), "top5": top_k(logits, y, 5),
                   "test_loss": float(F.cross_entropy(logits, y)), "examples": int(y.numel())}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
