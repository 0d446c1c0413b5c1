"""Class-conditional image generation (MNIST embedded; ImageNet 256 with SD-VAE latents).

Each image is one sample: a single image segment cut into blocks of `block` patches, labelled
with its class (dropped to the null class with probability `class_dropout` for guidance).
Evaluation samples a balanced set of classes with guidance and writes a class grid PNG; on
MNIST it reports the project classifier's accuracy on the requested classes and the Frechet
distance to the MNIST test set in that classifier's feature space; with `fid=True` it reports
Inception FID / IS / precision / recall against a reference set and writes an ADM `.npz`.

VAE latents (codec="vae", or a latent cache) are the posterior mean, the same latent every epoch;
DiT and the ACDiT reference draw a posterior sample at every step instead (SD-VAE's posterior std
is small next to the latents' spread). tokenizers/cache_latents.py --sample caches a sample.
The evaluation's sampling is shared among the processes of a distributed launch (unimodal/shards.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unimodal import data as D
from unimodal import shards
from unimodal.codecs import PixelCodec, VAECodec
from unimodal.diffusion import LossConfig, sampling_scheduler, train_scheduler, training_loss
from unimodal.sampling import SequenceSampler, row_generators
from unimodal.sequence import Image, PackSpec, Sample, pack
from unimodal.visualize import save_image_grid, to_uint8

from .base import CODECS, SCHEDULERS, Task, check_config


@dataclass
class ClassImageConfig:
    dataset: str = "mnist"  # mnist | an ImageFolder / HF dataset path | a latent cache directory
    image_size: int = 32  # MNIST is zero-padded from 28
    num_classes: int = 10
    codec: str = "pixel"  # pixel | vae
    vae_path: str = ""  # a local diffusers AutoencoderKL directory (codec = vae)
    block: int = 64  # patches per block (a square number, or the whole image)
    hflip: bool = False
    class_dropout: float = 0.1
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (0: plain epsilon MSE, as the paper)
    cfg_scale: float = 1.5
    sample_steps: int = 25
    scheduler: str = "dpm"
    eval_samples: int = 1000  # generated images for the evaluation metrics
    eval_batch: int = 250
    fid: bool = False  # Inception FID / IS / precision / recall (slow on CPU)
    # FID reference: a dataset (its training split; default: `dataset`) or an ADM reference batch .npz
    # (VIRTUAL_imagenet256_labeled.npz: the statistics DiT and ACDiT report FID against)
    fid_reference: str = ""
    fid_reference_images: int = 0  # images of a dataset reference, in a fixed random order (0: all, as ADM)
    inception_path: str = ""  # local TorchScript Inception (default: the offline carrier)

    def __post_init__(self) -> None:
        check_config(self, ("image_size", "num_classes", "block", "sample_steps", "eval_samples", "eval_batch"),
                     ("class_dropout", "snr_gamma", "cfg_scale", "fid_reference_images"),
                     {"codec": CODECS, "scheduler": SCHEDULERS})


class ClassImageTask(Task):
    sharded_eval = True

    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        t = self.tc = cfg.task
        if t.codec == "pixel":
            self.codec = PixelCodec(channels=cfg.model.latent_channels)
        elif t.codec == "vae":
            self.codec = VAECodec(t.vae_path, device=self.device)
        else:
            raise ValueError(f"task.codec must be 'pixel' or 'vae', got {t.codec!r}")
        self.spec = PackSpec(patch_size=cfg.model.patch_size, latent_channels=cfg.model.latent_channels,
                             positions="mrope" if cfg.model.rope_axes == 3 else "reference")
        # training drops each image's last clean block: nothing attends to it
        self.train_spec = dataclasses.replace(self.spec, drop_dead_clean=True)
        self.scheduler = train_scheduler()
        self.loss_cfg = LossConfig(class_dropout=t.class_dropout, snr_gamma=t.snr_gamma)
        self._data = None

    # -------------------------------------------------------------- data
    def _load(self):
        if self._data is None:
            t = self.tc
            if t.dataset == "mnist":
                x, y = D.mnist_arrays("train")
                x = D._pad(x, t.image_size) if t.image_size != 28 else x
                self._data = ("array", torch.from_numpy(x), torch.from_numpy(y))
            else:
                cached = Path(t.dataset, "meta.json").exists()
                if cached:  # its latents are decoded by this task's codec
                    D.check_latent_cache(t.dataset, self.codec, self.cfg.model.latent_channels)
                ds = D.build_dataset(t.dataset, "train", **({} if cached else {"size": t.image_size}))
                self._data = ("dataset", ds, None)
        return self._data

    def dataset_size(self) -> int:
        kind, a, _ = self._load()
        return len(a)

    def _train_latents(self, idx: list[int], flip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (N, c, h, w) on the device, labels (N,)) of examples idx, flipped where `flip` (N,) says
        (`data.flipped_examples`: images before encoding, a latent cache's latent_flip)."""
        x, y, is_latent = D.flipped_examples(*self._load(), idx, flip)
        return (x.to(self.device), y) if is_latent else (self.encode(x), y)

    @torch.no_grad()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) or (N, C, H, W) -> latents (N, c, h, w)."""
        return self.codec.encode(D.image_batch(images_u8).to(self.device)).float()

    def batch(self, step: int):
        idx, pos = self.indices(step)
        gens = self.generators(step, pos)
        flip = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in gens]) if self.tc.hflip else None
        lat, y = self._train_latents(idx, flip)  # (N, c, h, w), (N,)
        samples = [Sample([Image(lat[i].cpu(), block=self.tc.block)], label=int(y[i])) for i in range(len(idx))]
        return pack(samples, self.train_spec).to(self.device), gens

    def loss(self, model, batch):
        packed, gens = batch
        return training_loss(model, packed, self.scheduler, self.loss_cfg, gens)

    # -------------------------------------------------------------- sampling and evaluation
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.codec.downsample
        s = self.tc.image_size // f
        return (self.cfg.model.latent_channels, s, s)

    @torch.no_grad()
    def generate(self, model, labels: torch.Tensor, seed: int = 0, steps: int | None = None,
                 cfg_scale: float | None = None, first: int = 0) -> torch.Tensor:
        """labels (N,) -> images (N, C, H, W) in [-1, 1]: samples first .. first + N - 1 of the set drawn with
        this seed (each from its own generator, `row_generators`: the same image whatever the batch)."""
        t = self.tc
        C, H, W = self.latent_shape()
        n_tok = (H // self.spec.patch_size) * (W // self.spec.patch_size)
        s = SequenceSampler(model, self.spec, labels.shape[0], labels, cfg_scale if cfg_scale is not None else t.cfg_scale,
                            t.scheduler, steps or t.sample_steps, max_len=n_tok + 8,
                            generator=row_generators(seed, labels.shape[0], first),
                            precision=self.cfg.precision)
        z = s.image(C, H, W, block=t.block)  # (N, C, H, W)
        return self.codec.decode(z.to(self.device).float()).clamp(-1, 1)

    def preview(self, model, out_dir: Path, step: int) -> list[Path]:
        k = min(self.tc.num_classes, 10)
        labels = torch.arange(k).repeat_interleave(k)
        imgs = self.generate(model, labels, seed=step)
        return [save_image_grid(imgs, Path(out_dir) / f"samples_step{step:07d}.png", nrow=k, scale=2)]

    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        t = self.tc
        net = None
        if t.fid:  # before sampling: a missing network or a reference without pixels fails at once
            from unimodal import metrics as M
            if t.fid_reference or t.dataset != "mnist":
                M.check_reference_source(t.fid_reference or t.dataset)
            net = M.InceptionFeatures(t.inception_path or None, device=self.device)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n = min(t.eval_samples, 200) if quick else t.eval_samples
        k = t.num_classes
        g = min(k, 10)
        grid_labels = torch.arange(g).repeat_interleave(g)  # a row per class
        # the grid's digits are the first evaluation samples when the classes allow it
        shared = k == g and n >= g * g
        labels = torch.cat([grid_labels, torch.arange(n - g * g) % k]) if shared else torch.arange(n) % k
        # batches shared among the processes of a distributed launch; process 0 goes on with the whole set
        tag = shards.weights_tag(model, **self.sampling_settings(), n=n, seed=1000)
        u8 = shards.sample_set(
            lambda first, count: to_uint8(self.generate(model, labels[first:first + count], seed=1000, first=first)),
            n, t.eval_batch, out_dir, tag)  # (n, C, H, W) uint8
        if u8 is None:
            return {}
        grid = torch.from_numpy(u8[:g * g]).float() / 127.5 - 1 if shared else self.generate(model, grid_labels, seed=7)
        grid_path = save_image_grid(grid.cpu(), out_dir / "class_grid.png", nrow=g, scale=3)
        np.savez(out_dir / "samples.npz", arr_0=u8.transpose(0, 2, 3, 1), labels=labels.numpy())  # ADM layout NHWC
        metrics: dict = {"samples": n, "class_grid": str(grid_path)}
        if t.dataset == "mnist":
            metrics.update(mnist_quality(u8[:, 0], labels.numpy(), t.image_size))
        if net is not None:
            if t.dataset == "mnist" and not t.fid_reference:  # the test digits, padded as the training ones
                x, _ = D.mnist_arrays("test")
                x = D._pad(x, t.image_size) if t.image_size != 28 else x
                ref = M.reference_stats(net, np.repeat(x[:500 if quick else None, :, :, None], 3, axis=-1))
            else:
                count = 500 if quick else t.fid_reference_images
                ref = M.image_reference(net, t.fid_reference or t.dataset, t.image_size, count=count)
            rgb = np.repeat(u8, 3, axis=1) if u8.shape[1] == 1 else u8
            metrics.update(M.image_metrics(net, rgb.transpose(0, 2, 3, 1), ref))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shards.done(out_dir, tag, n, t.eval_batch)
        return metrics

    def sampling_settings(self) -> dict:
        """What an evaluation sample depends on besides the weights."""
        t = self.tc
        return {"cfg_scale": t.cfg_scale, "sample_steps": t.sample_steps, "scheduler": t.scheduler, "block": t.block,
                "image_size": t.image_size, "codec": t.codec, "vae_path": t.vae_path, "num_classes": t.num_classes,
                "precision": self.cfg.precision, "patch_size": self.cfg.model.patch_size}


def mnist_quality(images_u8: np.ndarray, labels: np.ndarray, size: int) -> dict:
    """Class accuracy of generated digits under the project's MNIST classifier, and the Frechet
    distance to the MNIST test set in its feature space."""
    from unimodal import metrics as M
    from unimodal import mnist_net
    x = images_u8
    if size != 28:  # undo the zero padding
        o = (size - 28) // 2
        x = x[:, o:o + 28, o:o + 28]
    net = mnist_net.load()
    logits = mnist_net.classify(x, net)
    acc = float((logits.argmax(-1).numpy() == labels).mean())
    test_x, _ = D.mnist_arrays("test")
    fd = M.fid_from_features(mnist_net.features(x, net).numpy(), mnist_net.features(test_x, net).numpy())
    return {"class_accuracy": acc, "frechet_distance_mnist_features": fd}
