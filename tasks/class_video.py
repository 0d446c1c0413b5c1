"""Class-conditional video generation (Moving MNIST embedded; UCF-101 with SD-VAE latents).

Each clip is one sample: a single video segment cut into blocks of `frames_per_block` whole
frames, labelled with its class (dropped to the null class with probability `class_dropout`
for guidance). The embedded default is one-digit Moving MNIST whose label is the digit.

Evaluation samples a balanced set of classes with guidance and writes a GIF (and MP4) grid, one
column per class. On Moving MNIST it scores the clips with the project MNIST classifier: every
frame is cropped to the 28x28 window holding the most ink (the digit, which is 28x28 on the
canvas) and classified; `frame_accuracy` is the fraction of generated frames classified as the
requested digit, `clip_accuracy` the fraction of clips whose majority vote is right, and
`real_frame_accuracy` the same measurement on real test clips (the ceiling of the measure).
With `extend_frames` > frames it also generates longer clips than were trained (the sampler
continues the block sequence) and writes a second GIF, scoring the frames past the training
length. With `fvd=True` it reports the Frechet Video Distance (I3D, Kinetics-400) against real
clips: slow on CPU, needs >= 9 frames; frames are resized to 224 by the metric. It is the FVD of
Unterthiner et al.'s TF code (bilinear resize, unbiased covariance, clips from frame 0), not
StyleGAN-V's variant (trilinear resize, random clip offsets), and with few clips (hundreds rather
than the 2048 of the UCF-101 protocol) it is biased upwards: compare FVDs only at equal clip counts. VAE latents are the
posterior mean (see tasks/class_image.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from unimodal import data as D
from unimodal import shards
from unimodal.codecs import PixelCodec, VAECodec
from unimodal.diffusion import LossConfig, train_scheduler, training_loss
from unimodal.sampling import SequenceSampler, row_generators
from unimodal.sequence import PackSpec, Sample, Video, pack
from unimodal.visualize import save_video_grid, to_uint8

from .base import CODECS, SCHEDULERS, Task, check_config


@dataclass
class ClassVideoConfig:
    dataset: str = "moving_mnist"  # moving_mnist | a UCF-101 root (with ucfTrainTestlist/) | a latent cache directory
    frames: int = 16  # frames per clip
    image_size: int = 32  # frame size in pixels (Moving MNIST canvas, >= 28; UCF-101 resize)
    num_classes: int = 10
    num_clips: int = 10000  # Moving MNIST training clips (one digit each)
    speed: tuple[float, float] = (1.0, 3.0)  # Moving MNIST digit speed range, pixels per frame
    frame_stride: int = 1  # UCF-101: take every k-th frame
    fold: int = 1  # UCF-101 split fold
    # UCF-101 read from the videos: each clip's first frame drawn anew at every visit ("random": the temporal
    # crop of TATS, StyleGAN-V and Latte), or frame 0 ("start": the clip a latent cache holds)
    temporal_crop: str = "random"
    codec: str = "pixel"  # pixel | vae
    vae_path: str = ""  # a local diffusers AutoencoderKL directory (codec = vae)
    positions: str = "mrope"  # PackSpec positions: mrope | reference (identical for a lone video segment)
    frames_per_block: int = 4  # frames per autoregressive block
    hflip: bool = False  # random horizontal flips (a latent cache's latent_flip column when it has one)
    class_dropout: float = 0.1
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (0: plain epsilon MSE, as the paper)
    cfg_scale: float = 2.5
    sample_steps: int = 25
    scheduler: str = "dpm"
    eval_samples: int = 100  # generated clips for the metrics (a balanced set of classes)
    eval_batch: int = 50
    extend_frames: int = 0  # > frames: also generate clips of this many frames (e.g. 2 * frames)
    fps: int = 8  # GIF / MP4 frame rate
    mp4: bool = True  # also write the grid as an H.264 MP4
    fvd: bool = False  # Frechet Video Distance with I3D (slow on CPU)
    fvd_reference: str = ""  # real clips for FVD: a UCF-101 root (default: the training data)
    fvd_reference_clips: int = 2048  # at most this many real clips for the FVD statistics
    i3d_path: str = ""  # local I3D weights (default: the offline carrier)

    def __post_init__(self) -> None:
        check_config(self, ("frames", "image_size", "num_classes", "num_clips", "frame_stride", "frames_per_block",
                            "sample_steps", "eval_samples", "eval_batch", "fps", "fvd_reference_clips"),
                     ("class_dropout", "snr_gamma", "cfg_scale", "extend_frames"),
                     {"codec": CODECS, "scheduler": SCHEDULERS, "temporal_crop": ("random", "start"),
                      "positions": ("mrope", "reference")})


class ClassVideoTask(Task):
    sharded_eval = True

    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        t = self.tc = cfg.task
        if t.frames % t.frames_per_block:
            raise ValueError(f"task.frames={t.frames} is not divisible by task.frames_per_block={t.frames_per_block}")
        if t.extend_frames and (t.extend_frames <= t.frames or t.extend_frames % t.frames_per_block):
            raise ValueError(f"task.extend_frames={t.extend_frames} must exceed task.frames={t.frames} and be a "
                             f"multiple of task.frames_per_block={t.frames_per_block} (0 turns it off)")
        if t.temporal_crop not in ("random", "start"):
            raise ValueError(f"task.temporal_crop must be 'random' or 'start', got {t.temporal_crop!r}")
        if t.codec == "pixel":
            self.codec = PixelCodec(channels=cfg.model.latent_channels)
        elif t.codec == "vae":
            self.codec = VAECodec(t.vae_path, device=self.device)
        else:
            raise ValueError(f"task.codec must be 'pixel' or 'vae', got {t.codec!r}")
        if cfg.model.latent_channels != self.codec.latent_channels:
            raise ValueError(f"model.latent_channels={cfg.model.latent_channels} but the {t.codec} codec has "
                             f"{self.codec.latent_channels} latent channels")
        self.spec = PackSpec(patch_size=cfg.model.patch_size, latent_channels=cfg.model.latent_channels,
                             positions=t.positions, drop_dead_clean=True)
        self.sample_spec = PackSpec(patch_size=cfg.model.patch_size, latent_channels=cfg.model.latent_channels,
                                    positions=t.positions)
        self.scheduler = train_scheduler()
        self.loss_cfg = LossConfig(class_dropout=t.class_dropout, snr_gamma=t.snr_gamma)
        self._data = None

    # -------------------------------------------------------------- data
    @property
    def moving_mnist(self) -> bool:
        return self.tc.dataset == "moving_mnist"

    def _moving_mnist(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One-digit clips uint8 (n, T, S, S) and their digits (n,)."""
        t = self.tc
        videos, digits = D.moving_mnist_arrays(n, t.frames, t.image_size, digits=1, seed=0 if split == "train" else 1,
                                               split=split, speed=tuple(t.speed))
        return videos, digits[:, 0]

    def _load(self):
        if self._data is None:
            t = self.tc
            if self.moving_mnist:
                x, y = self._moving_mnist("train", t.num_clips)
                self._data = ("array", torch.from_numpy(x), torch.from_numpy(y))
            elif Path(t.dataset, "meta.json").exists():  # its latents are decoded by this task's codec
                D.check_latent_cache(t.dataset, self.codec, self.cfg.model.latent_channels)
                self._data = ("dataset", D.load_latent_cache(t.dataset), None)
            else:
                self._data = ("dataset", D.build_dataset(t.dataset, "train", frames=t.frames, stride=t.frame_stride,
                                                         size=t.image_size, fold=t.fold), None)
        return self._data

    def dataset_size(self) -> int:
        return len(self._load()[1])

    def _examples(self, idx: list[int], gens: list[torch.Generator]):
        """-> (clips, labels, is_latent): uint8 (N, T, H, W[, 3]) pixels or float (N, T, c, h, w) latents."""
        kind, a, b = self._load()
        flip = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in gens]) if self.tc.hflip \
            else torch.zeros(len(idx), dtype=torch.bool)
        if kind == "array":
            x = a[idx]
            return torch.where(flip[:, None, None, None], x.flip(-1), x), b[idx], False
        t = self.tc
        raw = a.with_format(None)
        if t.temporal_crop == "random" and "path" in raw.column_names and not {"video", "latent"} & set(raw.column_names):
            rows = raw[idx]  # paths and labels, not yet decoded: each clip from its own random first frame
            starts = [float(torch.rand((), generator=g)) for g in gens]  # in [0, 1) of the starts that fit
            x = torch.as_tensor(np.stack([D.decode_video(path, t.frames, t.frame_stride, u, t.image_size, "spread")[0]
                                          for path, u in zip(rows["path"], starts)]))  # (N, T, H, W, 3)
            y = torch.as_tensor(np.asarray(rows["label"]))
            return torch.where(flip[:, None, None, None, None], x.flip(-2), x), y, False
        rows = a[idx]
        y = torch.as_tensor(np.asarray(rows["label"]))
        if "latent" in rows:
            z = torch.as_tensor(np.asarray(rows["latent"], np.float32))  # (N, T, c, h, w)
            if "latent_flip" in rows:
                zf = torch.as_tensor(np.asarray(rows["latent_flip"], np.float32))
            else:
                zf = z.flip(-1)
            return torch.where(flip[:, None, None, None, None], zf, z), y, True
        x = torch.as_tensor(np.asarray(rows["video"]))  # (N, T, H, W, 3)
        return torch.where(flip[:, None, None, None, None], x.flip(-2), x), y, False

    @torch.no_grad()
    def encode(self, clips_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, T, H, W) or (N, T, H, W, 3) -> latents (N, T, c, h, w)."""
        return self.codec.encode(D.video_batch(clips_u8).to(self.device)).float()

    def batch(self, step: int):
        idx, pos = self.indices(step)
        gens = self.generators(step, pos)
        x, y, is_latent = self._examples(idx, gens)
        lat = x.float() if is_latent else self.encode(x)  # (N, T, c, h, w)
        if lat.shape[1] != self.tc.frames:
            raise ValueError(f"clips have {lat.shape[1]} frames, task.frames is {self.tc.frames}")
        samples = [Sample([Video(lat[i].cpu(), self.tc.frames_per_block)], label=int(y[i])) for i in range(len(idx))]
        return pack(samples, self.spec).to(self.device), gens

    def loss(self, model, batch):
        packed, gens = batch
        return training_loss(model, packed, self.scheduler, self.loss_cfg, gens)

    # -------------------------------------------------------------- sampling
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.tc.image_size // self.codec.downsample
        return (self.cfg.model.latent_channels, s, s)

    @torch.no_grad()
    def generate(self, model, labels: torch.Tensor, seed: int = 0, frames: int | None = None,
                 steps: int | None = None, cfg_scale: float | None = None, first: int = 0) -> torch.Tensor:
        """labels (N,) -> clips (N, T, C, H, W) in [-1, 1]; `frames` may exceed the training length. Samples
        first .. first + N - 1 of the set drawn with this seed (one generator each, `row_generators`)."""
        t = self.tc
        T = frames or t.frames
        C, H, W = self.latent_shape()
        p = self.spec.patch_size
        s = SequenceSampler(model, self.sample_spec, labels.shape[0], labels,
                            t.cfg_scale if cfg_scale is None else cfg_scale, t.scheduler, steps or t.sample_steps,
                            max_len=T * (H // p) * (W // p) + 8, generator=row_generators(seed, labels.shape[0], first),
                            precision=self.cfg.precision)
        z = s.video(T, C, H, W, t.frames_per_block)  # (N, T, C, H, W)
        return self.codec.decode(z.to(self.device).float()).clamp(-1, 1).cpu()

    def _sample_set(self, model, labels: torch.Tensor, seed: int, frames: int | None = None) -> torch.Tensor:
        out = [self.generate(model, chunk, seed=seed, frames=frames, first=i * self.tc.eval_batch)
               for i, chunk in enumerate(tqdm(labels.split(self.tc.eval_batch), desc="sampling", leave=False))]
        return torch.cat(out)  # (N, T, C, H, W)

    def _save_grid(self, videos: torch.Tensor, out_dir: Path, name: str, nrow: int) -> list[Path]:
        scale = 2 if videos.shape[-1] <= 64 else 1
        paths = [save_video_grid(videos, out_dir / f"{name}.gif", nrow=nrow, fps=self.tc.fps, scale=scale)]
        if self.tc.mp4:
            paths.append(save_video_grid(videos, out_dir / f"{name}.mp4", nrow=nrow, fps=self.tc.fps, scale=scale))
        return paths

    def preview(self, model, out_dir: Path, step: int) -> list[Path]:
        k = min(self.tc.num_classes, 10)
        videos = self.generate(model, torch.arange(k), seed=step)
        return [save_video_grid(videos, Path(out_dir) / f"videos_step{step:07d}.gif", nrow=k, fps=self.tc.fps,
                                scale=2 if videos.shape[-1] <= 64 else 1)]

    # -------------------------------------------------------------- evaluation
    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        t = self.tc
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        net = self._check_fvd() if t.fvd else None  # before sampling: what FVD needs, and the network
        n = min(t.eval_samples, 100) if quick else t.eval_samples
        k = t.num_classes
        g = min(k, 10)
        labels = torch.arange(n) % k
        # batches shared among the processes of a distributed launch; process 0 goes on with the whole set
        tag = shards.weights_tag(model, **self.sampling_settings(), n=n, seed=1000)
        u8 = shards.sample_set(
            lambda first, count: to_uint8(self.generate(model, labels[first:first + count], seed=1000, first=first)),
            n, t.eval_batch, out_dir, tag)  # (n, T, C, H, W) uint8
        if u8 is None:
            return {}
        shown = (labels < g).nonzero().flatten()[: g * 10]  # rows of classes 0..g-1, one column per class
        self._save_grid(torch.from_numpy(u8[shown.numpy()]).float() / 127.5 - 1, out_dir, "videos", nrow=g)
        u8 = u8.transpose(0, 1, 3, 4, 2)  # (n, T, H, W, C)
        np.savez(out_dir / "samples.npz", videos=u8, labels=labels.numpy())
        metrics: dict = {"samples": n, "frames": t.frames}
        if self.moving_mnist:
            metrics.update(moving_mnist_quality(u8[..., 0], labels.numpy()))
            real, real_y = self._moving_mnist("test", max(n, 100))
            metrics["real_frame_accuracy"] = moving_mnist_quality(real, real_y)["frame_accuracy"]
        if t.extend_frames:
            ext_labels = torch.arange(g)
            ext = self._sample_set(model, ext_labels, seed=2000, frames=t.extend_frames)  # (g, 2T, C, H, W)
            self._save_grid(ext, out_dir, "videos_extended", nrow=g)
            metrics["extend_frames"] = t.extend_frames
            if self.moving_mnist:
                beyond = to_uint8(ext[:, t.frames:, 0])  # (g, T_ext - T, H, W): frames past the training length
                metrics["extend_frame_accuracy"] = moving_mnist_quality(beyond, ext_labels.numpy())["frame_accuracy"]
        if net is not None:
            metrics["fvd"] = self._fvd(net, u8, quick)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        shards.done(out_dir, tag, n, t.eval_batch)
        return metrics

    def sampling_settings(self) -> dict:
        """What an evaluation clip depends on besides the weights."""
        t = self.tc
        return {"cfg_scale": t.cfg_scale, "sample_steps": t.sample_steps, "scheduler": t.scheduler,
                "frames": t.frames, "frames_per_block": t.frames_per_block, "image_size": t.image_size,
                "codec": t.codec, "vae_path": t.vae_path, "num_classes": t.num_classes, "positions": t.positions,
                "precision": self.cfg.precision, "patch_size": self.cfg.model.patch_size}

    def _fvd(self, net, fake_u8: np.ndarray, quick: bool) -> float:
        """FVD of generated uint8 (N, T, H, W, C) clips against real clips of the same length and size."""
        from unimodal import metrics as M

        t = self.tc
        n_ref = min(t.fvd_reference_clips, 256 if quick else t.fvd_reference_clips)
        if self.moving_mnist:
            real, _ = self._moving_mnist("test", n_ref)
            real = np.repeat(real[..., None], 3, axis=-1)  # (n, T, H, W, 3)
            key = f"moving_mnist-test-{t.frames}x{t.image_size}-{tuple(t.speed)}-{n_ref}"
            ref = M.reference_stats(net, real, key=key)
        else:
            ref = M.video_reference(net, t.fvd_reference or t.dataset, t.frames, t.image_size, stride=t.frame_stride,
                                    fold=t.fold, count=n_ref)
        fake = np.repeat(fake_u8, 3, axis=-1) if fake_u8.shape[-1] == 1 else fake_u8
        return M.frechet_distance(*M.feature_stats(net(fake)), ref["mu"], ref["sigma"])

    def _check_fvd(self):
        """Before sampling: what FVD needs of the settings; returns the I3D network."""
        from unimodal import metrics as M
        from unimodal.i3d import MIN_FRAMES

        t = self.tc
        if t.frames < MIN_FRAMES:
            raise ValueError(f"FVD needs clips of at least {MIN_FRAMES} frames (I3D); task.frames is {t.frames}")
        if not self.moving_mnist:
            M.check_reference_source(t.fvd_reference or t.dataset, "FVD")
        return M.I3DFeatures(t.i3d_path or None, device=self.device)


def digit_crops(frames_u8: np.ndarray, size: int = 28) -> np.ndarray:
    """uint8 (N, H, W) canvases -> (N, 28, 28): the 28x28 window holding the most ink in each; of the
    windows that hold it all, the one centred nearest the ink's centre of mass (as MNIST centres its
    digits, so that a pasted digit is cropped where it was)."""
    x = torch.as_tensor(frames_u8).float()[:, None]  # (N, 1, H, W)
    N, _, H, W = x.shape
    if H < size or W < size:
        raise ValueError(f"frames of {H}x{W} are smaller than the {size}x{size} digit window")
    mass = F.avg_pool2d(x, size, stride=1)[:, 0]  # (N, H - 27, W - 27)
    ink = x[:, 0].sum((1, 2)).clamp_min(1e-6)  # (N,)
    cy = (x[:, 0].sum(2) * torch.arange(H)).sum(1) / ink  # (N,) centre of mass (0 for blank frames)
    cx = (x[:, 0].sum(1) * torch.arange(W)).sum(1) / ink  # (N,)
    wy = torch.arange(mass.shape[1]) + (size - 1) / 2  # window centres
    wx = torch.arange(mass.shape[2]) + (size - 1) / 2
    dist = (wy[None, :, None] - cy[:, None, None]) ** 2 + (wx[None, None, :] - cx[:, None, None]) ** 2  # (N, h, w)
    most = mass >= mass.flatten(1).amax(1)[:, None, None] * (1 - 1e-6)  # (N, h, w)
    best = torch.where(most, -dist, -torch.inf).flatten(1).argmax(1)  # (N,)
    y0, x0 = best // mass.shape[-1], best % mass.shape[-1]
    rows = (y0[:, None] + torch.arange(size))[:, :, None]  # (N, 28, 1)
    cols = (x0[:, None] + torch.arange(size))[:, None, :]  # (N, 1, 28)
    return torch.as_tensor(frames_u8)[torch.arange(N)[:, None, None], rows, cols].numpy()  # (N, 28, 28)


def moving_mnist_quality(clips_u8: np.ndarray, labels: np.ndarray) -> dict:
    """One-digit clips uint8 (N, T, H, W) with their digits (N,) -> classifier scores:
    frame_accuracy (frames classified as the clip's digit), clip_accuracy (majority vote over
    frames is the digit) and frame_consistency (frames agreeing with their clip's majority)."""
    from unimodal import mnist_net

    N, T = clips_u8.shape[:2]
    crops = digit_crops(clips_u8.reshape(N * T, *clips_u8.shape[2:]))  # (N*T, 28, 28)
    pred = mnist_net.classify(crops).argmax(-1).view(N, T)  # (N, T)
    majority = pred.mode(dim=1).values  # (N,)
    y = torch.as_tensor(labels).long()
    return {"frame_accuracy": float((pred == y[:, None]).float().mean()),
            "clip_accuracy": float((majority == y).float().mean()),
            "frame_consistency": float((pred == majority[:, None]).float().mean())}
