"""Evaluation networks and statistics: FID, Inception Score, precision/recall, FVD.

Images: InceptionV3 with the 2015-12-05 FID weights, read from a local TorchScript file (default:
the `inception_fid` asset; the StyleGAN2-ADA `inception-2015-12-05.pt` works too and also gives
the 1008-way logits the Inception Score needs). Preprocessing is the TF pipeline's: uint8 RGB,
bilinear resize to 299 x 299 as tf.compat.v1.image.resize_bilinear does (no half-pixel centers,
no antialiasing), then (x - 128) / 128.
Videos: the Kinetics-400 I3D of unimodal.i3d; FVD preprocessing is the same bilinear resize to
224 x 224, then 2 x / 255 - 1. Features are logits averaged over time (400-d).

Statistics follow ADM's evaluator (Dhariwal & Nichol 2021): the Frechet distance (the value of
its scipy.linalg.sqrtm formula, computed with symmetric eigendecompositions), precision/recall of
Kynkaenniemi et al. 2019 with k = 3, the Inception Score over 10 splits (improved-gan's formula).
Reference statistics are summed in float64 batch by batch, over a whole training set if need be,
or read from an ADM reference batch (`adm_reference`).

    net = InceptionFeatures()                          # or InceptionFeatures("inception-2015-12-05.pt")
    ref = reference_stats(net, real_uint8_nhwc, key="imagenet256-train")   # cached .npz
    out = image_metrics(net, samples_uint8_nhwc, ref)  # {'fid', 'precision', 'recall'[, 'inception_score']}
    fvd(real_videos, fake_videos)                      # (N, T, H, W, 3) uint8 or [-1, 1] floats
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

Array = np.ndarray | torch.Tensor


# ---- statistics on features

def feature_stats(features: Array) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    f = _np(features).astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class Moments:
    """Mean and unbiased covariance of (N, D) features given in batches (float64 sums)."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, None, None

    def add(self, f: Array) -> None:
        f = _np(f).astype(np.float64)  # (B, D)
        if self.s1 is None:
            self.s1, self.s2 = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"moments of {self.n} feature rows: need at least 2")
        mu = self.s1 / self.n
        return mu, (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (the FID/FVD formula).

    The same value as ADM's evaluator (scipy.linalg.sqrtm of S1 S2; tested), computed from
    symmetric eigendecompositions: S1 S2 has the eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2),
    so Tr((S1 S2)^(1/2)) is the sum of their square roots. That stays exact and fast when the
    covariances are singular (fewer samples than dimensions), where sqrtm is slow and inaccurate.
    """
    mu1, mu2 = np.atleast_1d(_np(mu1)).astype(np.float64), np.atleast_1d(_np(mu2)).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(_np(sigma1)).astype(np.float64), np.atleast_2d(_np(sigma2)).astype(np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D) for both sets, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    w, v = scipy.linalg.eigh(sigma1)  # (D,), (D, D)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2)
    m = root1 @ sigma2 @ root1  # (D, D) symmetric PSD
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: Array, features2: Array) -> float:
    """Frechet distance between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def inception_score(logits: Array, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of (N, C) classifier logits: the mean and the (population)
    standard deviation over `splits` consecutive slices, exp E_x KL(p(y|x) || p(y)) in each, as
    improved-gan's and ADM's evaluators compute it."""
    x = torch.as_tensor(_np(logits), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise ValueError(f"logits must be (N, C) with N >= splits={splits} >= 1, got shape {tuple(x.shape)}")
    logp = torch.log_softmax(x, dim=1)  # (N, C)
    n, scores = len(x), []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]  # (n / splits, C)
        log_py = torch.logsumexp(part, dim=0) - math.log(len(part))  # (C,) log of the split's marginal
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real: Array, fake: Array, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of two (N, D) feature sets.

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest other point of the set. precision = fraction of fake points inside the real
    manifold, recall = fraction of real points inside the fake manifold (as ADM's evaluator).
    """
    real = torch.as_tensor(_np(real), dtype=torch.float32)  # (Nr, D)
    fake = torch.as_tensor(_np(fake), dtype=torch.float32)  # (Nf, D)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be (N, D) with the same D, got {tuple(real.shape)}, {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    r_real, r_fake = _knn_radii(real, k, chunk), _knn_radii(fake, k, chunk)  # (Nr,), (Nf,)
    fake_in, real_in = torch.zeros(len(fake), dtype=torch.bool), torch.zeros(len(real), dtype=torch.bool)
    for i in range(0, len(real), chunk):
        d = torch.cdist(real[i:i + chunk], fake)  # (c, Nf)
        real_in[i:i + chunk] = (d <= r_fake[None, :]).any(dim=1)
        fake_in |= (d <= r_real[i:i + chunk, None]).any(dim=0)
    return fake_in.sum().item() / len(fake), real_in.sum().item() / len(real)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row (the row itself is at distance 0)."""
    out = torch.empty(len(x))
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)  # (c, N)
        out[i:i + chunk] = d.kthvalue(k + 1, dim=1).values
    return out


# ---- preprocessing shared by the Inception and I3D pipelines

def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two axes as tf.compat.v1.image.resize_bilinear (align_corners=False,
    half_pixel_centers=False): output pixel j samples input coordinate j * in / out, edges clamped."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    for axis, (n_in, n_out) in ((-2, (h, size[0])), (-1, (w, size[1]))):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)  # (n_out,)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo).to(x.dtype)
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
    return x


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _images_nchw(images: Array) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W), C in {1, 3} -> float (N, 3, H, W) in [0, 255]."""
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 RGB or grayscale, got dtype {x.dtype}; convert [-1, 1] floats "
                        f"with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
    if x.ndim == 3:
        x = x[:, None]  # (N, 1, H, W)
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {{1, 3}}, "
                         f"got shape {tuple(x.shape)}")
    return x.float().expand(-1, 3, -1, -1)  # (N, 3, H, W)


def _batches(data, batch_size: int) -> Iterable:
    """An array is cut into batches; anything else is taken as an iterable of batches."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    return data


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


# ---- InceptionV3 (FID, Inception Score, precision/recall)

class InceptionFeatures:
    """2048-d pool3 features (and 1008-way logits when the file has the classifier head) of uint8 images."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 50):
        if path is None:
            from unimodal.assets import asset_path
            path = asset_path("inception_fid")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no TorchScript Inception file at {self.path}; pass the path of a local "
                                    f"inception-2015-12-05 TorchScript file")
        self.device, self.batch_size = torch.device(device), batch_size
        module = torch.jit.load(str(self.path), map_location=self.device).eval()
        # the carrier wraps the network in `.net`; StyleGAN2-ADA's file has `.layers` and `.output` at the top
        root = module.net if hasattr(module, "net") else module
        # `layers` maps the preprocessed (N, 3, 299, 299) input to pool3 (N, 2048, 1, 1); without it the
        # whole module must take that input itself
        self.layers = root.layers if hasattr(root, "layers") else module
        w = root.output.weight if hasattr(root, "output") else None
        # the Inception Score uses the softmax layer without its bias, as the original TF code does
        self.logits_weight = w.detach().float() if w is not None else None  # (1008, 2048)
        self.id = f"{self.path.stem}-{_file_digest(self.path)}"

    @property
    def has_logits(self) -> bool:
        return self.logits_weight is not None

    @torch.no_grad()
    def batches(self, images, progress: bool = True, total: int | None = None):
        """uint8 images (array, or iterable of batches) -> features (B, 2048) float32 tensors, batch by batch."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            total = -(-len(images) // self.batch_size)
        for batch in tqdm(_batches(images, self.batch_size), total=total, disable=not progress, desc="inception"):
            x = _images_nchw(batch).to(self.device)  # (B, 3, H, W) in [0, 255]
            x = (resize_bilinear_tf1(x, (299, 299)) - 128.0) / 128.0  # (B, 3, 299, 299)
            f = self.layers(x.contiguous(memory_format=torch.channels_last)).reshape(len(x), -1)  # (B, 2048)
            if f.shape[1] != 2048:
                raise ValueError(f"{self.path} returned {f.shape[1]}-d features, expected 2048 (pool3)")
            yield f.float().cpu()

    def __call__(self, images, logits: bool = False, progress: bool = True):
        """uint8 images (array, or iterable of batches) -> features (N, 2048) float32 numpy,
        and logits (N, 1008) with logits=True."""
        if logits and not self.has_logits:
            raise ValueError(f"{self.path} has no classifier head (`output` layer), so no logits for the "
                             f"Inception Score; use StyleGAN2-ADA's inception-2015-12-05.pt")
        feats = list(self.batches(images, progress))
        if not feats:
            raise ValueError("no images given")
        f = torch.cat(feats)  # (N, 2048)
        return (f.numpy(), (f @ self.logits_weight.T.cpu()).numpy()) if logits else f.numpy()  # logits (N, 1008)


# ---- I3D (FVD)

class I3DFeatures:
    """400-d FVD features (Kinetics-400 logits averaged over time) of videos."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 4):
        from unimodal.assets import asset_path
        from unimodal.i3d import load_i3d

        self.path = Path(path) if path is not None else asset_path("i3d_kinetics400")
        self.device, self.batch_size = torch.device(device), batch_size
        self.net = load_i3d(self.path, self.device)
        self.id = f"i3d-{_file_digest(self.path)}"

    @torch.no_grad()
    def batches(self, videos, progress: bool = True, total: int | None = None):
        """(N, T, H, W, 3) uint8 or [-1, 1] float videos (array, or iterable of batches) -> (B, 400) float32
        tensors, batch by batch."""
        if isinstance(videos, (np.ndarray, torch.Tensor)):
            total = -(-len(videos) // self.batch_size)
        for batch in tqdm(_batches(videos, self.batch_size), total=total, disable=not progress, desc="i3d"):
            yield self.net(fvd_preprocess(batch).to(self.device)).float().cpu()  # (B, 400)

    def __call__(self, videos, progress: bool = True) -> np.ndarray:
        """(N, T, H, W, 3) uint8 or [-1, 1] float videos (array, or iterable of batches) -> (N, 400) float32."""
        feats = list(self.batches(videos, progress))
        if not feats:
            raise ValueError("no videos given")
        return torch.cat(feats).numpy()


def fvd_preprocess(videos: Array) -> torch.Tensor:
    """(N, T, H, W, 3) uint8, or float in [-1, 1] -> (N, 3, T, 224, 224) float32 in [-1, 1]."""
    from unimodal.i3d import MIN_FRAMES

    x = torch.as_tensor(videos) if not isinstance(videos, torch.Tensor) else videos
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"videos must be (N, T, H, W, 3) RGB, got shape {tuple(x.shape)}")
    if x.shape[1] < MIN_FRAMES:
        raise ValueError(f"FVD needs at least {MIN_FRAMES} frames per video, got T={x.shape[1]}")
    if x.dtype == torch.uint8:
        x = x.float() * (2.0 / 255.0) - 1.0
    elif x.is_floating_point():
        lo, hi = x.min().item(), x.max().item()
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"float videos must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
        x = x.float().clamp(-1.0, 1.0)
    else:
        raise TypeError(f"videos must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    x = x.permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W)
    return resize_bilinear_tf1(x, (224, 224)).contiguous()  # (N, 3, T, 224, 224); linear, so resize after scaling


# ---- cached reference statistics and the metrics

def data_key(data: Array) -> str:
    """Identity of an array for the statistics cache: sha256 of its shape, dtype and bytes."""
    a = np.ascontiguousarray(_np(data))
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:16]


def reference_stats(net: InceptionFeatures | I3DFeatures, data, key: str | None = None,
                    cache_dir: str | Path | None = None, progress: bool = True, keep: int | None = None,
                    total: int | None = None) -> dict[str, np.ndarray]:
    """Mean and covariance of a reference set's features, and the features of its first `keep` items (all
    when None: for precision/recall), computed once and cached in an .npz.

    The moments are summed batch by batch in float64, so that the set may be larger than memory (ADM's
    reference statistics are over a whole training set, its precision/recall over 10,000 of its images:
    pass the data in a random order). The cache file is named by the network file's digest and `key`
    (default: data_key(data); an iterable of batches needs an explicit key). total: the iterable's batch
    count, for the progress bar. Returns {'features', 'mu', 'sigma', 'count'}.
    """
    if key is None:
        if not isinstance(data, (np.ndarray, torch.Tensor)):
            raise ValueError("reference_stats over an iterable of batches needs an explicit key=")
        key = data_key(data)
    if cache_dir is None:
        from unimodal.assets import cache_dir as default_cache_dir
        cache_dir = default_cache_dir() / "stats"
    path = Path(cache_dir) / f"{net.id}-{key}{'' if keep is None else f'-keep{keep}'}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("features", "mu", "sigma")}
            out["count"] = z["count"] if "count" in z.files else np.array(len(out["features"]))
            return out
    moments, kept = Moments(), []
    n_kept = 0
    for f in net.batches(data, progress=progress, total=total):
        moments.add(f)
        if keep is None or n_kept < keep:
            kept.append(f if keep is None else f[: keep - n_kept])
            n_kept += len(kept[-1])
    if moments.n == 0:
        raise ValueError(f"reference set {key!r} is empty")
    mu, sigma = moments.stats()
    out = {"features": torch.cat(kept).numpy(), "mu": mu, "sigma": sigma, "count": np.array(moments.n)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def adm_reference(net: InceptionFeatures, path: str | Path, progress: bool = True,
                  cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """An ADM reference batch (guided-diffusion's evaluations, e.g. VIRTUAL_imagenet256_labeled.npz): its
    'mu' and 'sigma' (statistics over the whole training set, as DiT and ACDiT report FID against) and the
    features of its 'arr_0' images (10,000, uint8 NHWC) for precision/recall."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        missing = {"arr_0", "mu", "sigma"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not an ADM reference batch: it lacks {sorted(missing)} (has {z.files})")
        mu, sigma = z["mu"], z["sigma"]
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not Inception pool3 statistics "
                         f"((2048,) and (2048, 2048))")

    def images(step: int = 500):  # read only when the features are not cached yet
        with np.load(path, allow_pickle=False) as z:
            arr = z["arr_0"]  # (N, H, W, 3) uint8
        for i in range(0, len(arr), step):
            yield arr[i:i + step]
    ref = reference_stats(net, images(), key=f"adm-{path.stem}-{_file_digest(path)}", progress=progress,
                          cache_dir=cache_dir)
    return {**ref, "mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}


def _source_key(source: str | Path) -> str:
    p = Path(source).expanduser()
    return f"{p.name}-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}"


def check_reference_source(source: str | Path, what: str = "FID") -> None:
    """Refuses, before any sampling, a reference the metric cannot read: a latent cache (no pixels)."""
    if Path(source, "meta.json").is_file():
        raise ValueError(f"{what} needs real pixels: {source} is a latent cache; point the reference at the "
                         f"images (an image folder, a saved dataset, or an ADM reference batch .npz)")


def image_reference(net: InceptionFeatures, source: str | Path, size: int, count: int = 0, keep: int = 10000,
                    seed: int = 0, progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """FID / precision / recall reference of a data source: an ADM reference batch (.npz), or the training
    split of a dataset (`data.build_dataset`) at `size`, `count` images (0: all, as ADM's statistics) read in a
    fixed random order (a class-sorted folder's first rows would cover a few classes), the first `keep` of
    them kept for precision/recall. Cached by the source's path, size, count and seed."""
    if str(source).endswith(".npz"):
        return adm_reference(net, source, progress=progress, cache_dir=cache_dir)
    check_reference_source(source)
    from unimodal import data as D
    ds = D.build_dataset(str(source), "train", size=size)
    n = min(count, len(ds)) if count > 0 else len(ds)
    order = np.random.default_rng(seed).permutation(len(ds))[:n]
    step = 250

    def batches():
        for i in range(0, n, step):
            rows = ds[[int(j) for j in order[i:i + step]]]
            yield np.asarray(rows["image"]).transpose(0, 2, 3, 1)  # (B, H, W, 3) uint8
    key = f"{_source_key(source)}-train{size}-{n}of{len(ds)}-seed{seed}"
    return reference_stats(net, batches(), key=key, keep=keep, progress=progress, total=-(-n // step),
                           cache_dir=cache_dir)


def video_reference(net: I3DFeatures, source: str | Path, frames: int, size: int, stride: int = 1, fold: int = 1,
                    count: int = 2048, seed: int = 0, progress: bool = True,
                    cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """FVD reference of a video dataset's training split (`data.build_dataset`: UCF-101 and the like): `count`
    clips of `frames` frames `stride` apart at `size`, read in a fixed random order (split lists are sorted
    by class) and decoded one at a time. Cached by the source's path and these settings."""
    check_reference_source(source, "FVD")
    from unimodal import data as D
    ds = D.build_dataset(str(source), "train", frames=frames, stride=stride, size=size, fold=fold)
    n = min(count, len(ds)) if count > 0 else len(ds)
    order = np.random.default_rng(seed).permutation(len(ds))[:n]

    def batches(per: int = 8):
        for i in range(0, n, per):
            yield np.stack([np.asarray(ds[int(j)]["video"]) for j in order[i:i + per]])  # (B, T, H, W, 3)
    key = f"{_source_key(source)}-train{fold}-{frames}x{size}s{stride}-{n}-seed{seed}"
    return reference_stats(net, batches(), key=key, progress=progress, total=-(-n // 8), cache_dir=cache_dir)


def image_metrics(net: InceptionFeatures, samples, reference: dict[str, np.ndarray], k: int = 3,
                  splits: int = 10, progress: bool = True) -> dict[str, float]:
    """FID, precision and recall of uint8 `samples` against `reference` (from reference_stats), plus
    the Inception Score (mean over `splits`) when the network has logits."""
    if net.has_logits:
        feats, logits = net(samples, logits=True, progress=progress)
    else:
        feats, logits = net(samples, progress=progress), None
    out = {"fid": frechet_distance(*feature_stats(feats), reference["mu"], reference["sigma"])}
    out["precision"], out["recall"] = precision_recall(reference["features"], feats, k=k)
    if logits is None:
        warnings.warn(f"no Inception Score: {getattr(net, 'path', 'the network')} has no classifier head (pass StyleGAN2-ADA's "
                      f"inception-2015-12-05.pt for the 1008-way logits)")
    else:
        out["inception_score"], out["inception_score_std"] = inception_score(logits, splits=splits)
    return out


def fvd(videos1, videos2, net: I3DFeatures | None = None, progress: bool = True) -> float:
    """Frechet Video Distance between two sets of (N, T, H, W, 3) videos (uint8 or [-1, 1] floats)."""
    net = net or I3DFeatures()
    return fid_from_features(net(videos1, progress=progress), net(videos2, progress=progress))
