"""Datasets: embedded offline data and user data, all as HuggingFace `datasets.Dataset`.

Every loader returns a `datasets.Dataset` in numpy format with the stored dtypes kept
(`with_format("numpy", dtype=None)`), so uint8 pixels stay uint8:

    name          columns                                                    built by
    mnist         image uint8 (28,28) [or (S,S) padded], label int64          mnist()
    moving_mnist  video uint8 (T,H,W), label int64 (-1 if >1 digit), digits   moving_mnist()
    kjv / text    text str, book str, chapter int, verse int, citation str    kjv(), text_file()
    video_clips   video uint8 (T,H,W,3), name str, fps float, path str         video_clips()
    imagenet      image uint8 (3,S,S) ADM centre crop, label ClassLabel, path  imagenet(), image_folder(), hf_images()
    ucf101        video uint8 (T,S,S,3), label ClassLabel (classInd - 1), path ucf101()
    latents       latent float (c,h,w)|(T,c,h,w), label [, latent_flip]       load_latent_cache()

`build_dataset(name, split, **kw)` is the one entry point. Large real sets (ImageNet,
UCF-101) are lazy by default: an index of files whose images/videos are decoded on access;
`eager=True` decodes everything up front into Arrow.

Bad input raises `DataError` naming the file and the problem; with `on_error="skip"` the bad
item is left out and counted in a `Skipped` record (pass your own with `skipped=`; the count is
also logged). Lazy datasets decode on access, so they can only raise: use `eager=True` (or
tokenizers/cache_latents.py --on-error skip) to skip.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from unimodal.assets import VIDEO_ASSETS, asset_path, cache_dir

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # folders that are splits, never classes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the problem."""


@dataclass
class Skipped:
    """What a loader configured with on_error="skip" left out."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (source, problem)

    def add(self, source, problem: str) -> None:
        self.items.append((str(source), problem))

    @property
    def count(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        lines = [f"skipped {self.count} bad input(s)"] + [f"  {s}: {p}" for s, p in self.items[:20]]
        if self.count > 20:
            lines.append(f"  ... and {self.count - 20} more")
        return "\n".join(lines)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _bad(on_error: str, skipped: Skipped, source, problem: str) -> None:
    """Raise DataError or record the skip, according to on_error."""
    if on_error == "raise":
        raise DataError(f"{source}: {problem}")
    skipped.add(source, problem)


def _report(skipped: Skipped, what: str) -> None:
    if skipped.count:
        log.warning("%s: %s", what, skipped.summary())


def _numpy(ds):
    return ds.with_format("numpy", dtype=None)  # dtype=None keeps uint8 as uint8


def _split_names(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(allowed)}; got {split!r}")


# ----------------------------------------------------------------------------- tensors

def to_unit(x):
    """uint8 pixels (numpy or torch) -> float32 torch tensor in [-1, 1], same shape."""
    import torch

    x = torch.as_tensor(x)
    return x.float() / 127.5 - 1.0


def from_unit(x):
    """float in [-1, 1] -> uint8 torch tensor, same shape."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_batch(x):
    """uint8 images (N,H,W) or (N,C,H,W) -> float (N,C,H,W) in [-1, 1] for a codec."""
    x = to_unit(x)
    return x[:, None] if x.ndim == 3 else x  # (N,C,H,W)


def flipped_examples(kind: str, a, b, idx: list[int], flip=None):
    """Examples idx of an (images, labels) array pair (kind "array") or of a dataset of images or a latent
    cache -> (x, labels (N,), is_latent): uint8 images (N, [C,] H, W) or cached fp32 latents (N, c, h, w), each
    flipped horizontally where `flip` (N,) bool says: the image (before any encoding, as DiT's
    RandomHorizontalFlip), or the cache's `latent_flip` (the flipped image's latents; else the flipped latents)."""
    import torch

    if kind == "array":
        x, y = a[idx], b[idx]
    else:
        rows = a[idx]
        y = torch.as_tensor(np.asarray(rows["label"]))
        if "latent" in rows:
            z = torch.as_tensor(np.asarray(rows["latent"]), dtype=torch.float32)  # (N, c, h, w)
            if flip is not None:
                zf = torch.as_tensor(np.asarray(rows["latent_flip"]), dtype=torch.float32) \
                    if "latent_flip" in rows else z.flip(-1)  # (N, c, h, w)
                z = torch.where(flip[:, None, None, None], zf, z)
            return z, y, True
        x = torch.as_tensor(np.asarray(rows["image"]))  # uint8 (N, [C,] H, W)
    if flip is not None:
        x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
    return x, y, False


def video_batch(x):
    """uint8 videos (N,T,H,W) or (N,T,H,W,3) -> float (N,T,C,H,W) in [-1, 1] for a codec."""
    x = to_unit(x)
    if x.ndim == 4:
        return x[:, :, None]  # (N,T,1,H,W)
    return x.permute(0, 1, 4, 2, 3)  # (N,T,3,H,W)


# ----------------------------------------------------------------------------- MNIST

def _derived(name: str) -> Path:
    return cache_dir() / "derived" / name


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory through a temporary sibling, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mnist_convert(out: Path) -> None:
    import gzip
    import pickle

    src = asset_path("mnist")
    with gzip.open(src, "rb") as f:
        (trx, try_), (vax, vay), (tex, tey) = pickle.load(f, encoding="latin1")
    for name, x, y in (("train", np.concatenate([trx, vax]), np.concatenate([try_, vay])), ("test", tex, tey)):
        scaled = x.astype(np.float64) * 256  # (N,784), pixels are k/256
        steps = np.abs(scaled - np.round(scaled)).max()
        if steps > 1e-3 or x.min() < 0 or x.max() >= 1:
            raise DataError(f"{src}: {name} pixels are not multiples of 1/256 in [0, 1) (off by {steps:.3g})")
        imgs = np.clip(np.round(scaled), 0, 255).astype(np.uint8).reshape(-1, 28, 28)  # (N,28,28)
        np.save(out / f"{name}_images.npy", imgs)
        np.save(out / f"{name}_labels.npy", y.astype(np.int64))


def mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST as plain arrays: uint8 (N,28,28), int64 (N,). train 60k (train + val), test 10k."""
    _split_names(split, ("train", "test"))
    d = _derived("mnist") / "arrays"
    if not d.exists():
        _atomic_dir(d, _mnist_convert)
    return np.load(d / f"{split}_images.npy"), np.load(d / f"{split}_labels.npy")


def _pad(imgs: np.ndarray, size: int) -> np.ndarray:
    h, w = imgs.shape[-2:]
    if size < max(h, w):
        raise ValueError(f"cannot pad {h}x{w} images to {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros(imgs.shape[:-2] + (size, size), imgs.dtype)
    out[..., top:top + h, left:left + w] = imgs
    return out


def mnist(split: str = "train", size: int = 28):
    """MNIST: image uint8 (size,size) (28, or zero-padded to `size`), label int64."""
    from datasets import Array2D, Dataset, Features, Value, load_from_disk

    feats = Features({"image": Array2D((size, size), "uint8"), "label": Value("int64")})

    def build(split_, size_):
        x, y = mnist_arrays(split_)
        return Dataset.from_dict({"image": _pad(x, size_) if size_ != 28 else x, "label": y}, features=feats)

    if size != 28:
        return _numpy(build(split, size))
    d = _derived("mnist") / f"hf-{split}"
    if not d.exists():
        _atomic_dir(d, lambda tmp: build(split, 28).save_to_disk(str(tmp)))
    return _numpy(load_from_disk(str(d)))


# ----------------------------------------------------------------------------- Moving MNIST

def moving_mnist_arrays(num_clips: int = 1000, frames: int = 16, size: int = 64, digits: int = 2, seed: int = 0,
                        split: str = "train", speed: tuple[float, float] = (2.0, 5.0)):
    """Deterministic Moving MNIST: videos uint8 (N,T,size,size), digit labels int64 (N,digits).

    Each digit starts at a uniform position with a uniform direction and a speed in `speed`
    pixels per frame and bounces off the canvas edges; digits overlap by pixel maximum.
    Digits come from the MNIST `split`; the same arguments give byte-identical clips.
    """
    if size < 28:
        raise ValueError(f"moving_mnist canvas size must be >= 28 (the digit size), got {size}")
    if frames < 1 or digits < 1 or num_clips < 0:
        raise ValueError(f"moving_mnist needs frames >= 1, digits >= 1, num_clips >= 0; "
                         f"got {frames}, {digits}, {num_clips}")
    imgs, labels = mnist_arrays(split)
    rng = np.random.default_rng(seed)
    lim = float(size - 28)
    videos = np.zeros((num_clips, frames, size, size), np.uint8)  # (N,T,H,W)
    which = np.zeros((num_clips, digits), np.int64)
    for i in range(num_clips):
        idx = rng.integers(0, len(imgs), digits)
        pos = rng.uniform(0.0, lim, (digits, 2))  # (D,2) top-left (y, x)
        angle = rng.uniform(0.0, 2 * math.pi, digits)
        vel = rng.uniform(*speed, digits)[:, None] * np.stack([np.sin(angle), np.cos(angle)], 1)  # (D,2)
        which[i] = labels[idx]
        for t in range(frames):
            for k in range(digits):
                y, x = (int(v) for v in np.rint(pos[k]))
                patch = videos[i, t, y:y + 28, x:x + 28]  # (28,28) view
                np.maximum(patch, imgs[idx[k]], out=patch)
            pos += vel
            low, high = pos < 0, pos > lim  # bounce: reflect the position and the velocity
            pos[low] = -pos[low]
            pos[high] = 2 * lim - pos[high]
            vel[low | high] *= -1
            np.clip(pos, 0, lim, out=pos)
    return videos, which


def moving_mnist(split: str = "train", num_clips: int = 1000, frames: int = 16, size: int = 64, digits: int = 2,
                 seed: int | None = None, speed: tuple[float, float] = (2.0, 5.0)):
    """Moving MNIST: video uint8 (T,size,size), label (the digit if one digit, else -1), digits list.

    `seed` defaults to 0 for train and 1 for test; digits are drawn from the same MNIST split.
    """
    from datasets import Array3D, Dataset, Features, List, Value

    _split_names(split, ("train", "test"))
    seed = (0 if split == "train" else 1) if seed is None else seed
    videos, which = moving_mnist_arrays(num_clips, frames, size, digits, seed, split, speed)
    label = which[:, 0] if digits == 1 else np.full(num_clips, -1, np.int64)
    feats = Features({"video": Array3D((frames, size, size), "uint8"), "label": Value("int64"),
                      "digits": List(Value("int64"))})
    return _numpy(Dataset.from_dict({"video": videos, "label": label, "digits": which}, features=feats))


# ----------------------------------------------------------------------------- text

def read_text_lines(path, on_error: str = "raise", skipped: Skipped | None = None) -> list[dict]:
    """Rows from a .jsonl (objects with "text", other keys kept) or a plain text file (a line each).

    An empty line, a line that is not UTF-8, bad JSON or a missing "text" is a DataError naming
    the file and line, or skipped and counted with on_error="skip".
    """
    _check_on_error(on_error)
    skipped = Skipped() if skipped is None else skipped
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: text file does not exist")
    is_jsonl = p.suffix in (".jsonl", ".json")
    rows = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{p}:{n}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                _bad(on_error, skipped, where, f"line is not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                _bad(on_error, skipped, where, "empty line")
                continue
            if not is_jsonl:
                rows.append({"text": line})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(on_error, skipped, where, f"not a JSON object ({e.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                _bad(on_error, skipped, where, 'expected a JSON object with a string "text"')
                continue
            if not row["text"].strip():
                _bad(on_error, skipped, where, 'empty "text"')
                continue
            rows.append(row)
    if not rows:
        raise DataError(f"{p}: no usable text lines")
    return rows


def _text_dataset(rows: list[dict]):
    from datasets import Dataset

    keys = ["text"] + sorted({k for r in rows for k in r} - {"text"})
    cols = {k: [r.get(k) for r in rows] for k in keys}
    return _numpy(Dataset.from_dict(cols))


def kjv(split: str = "train", test_every: int = 20, path=None, on_error: str = "raise",
        skipped: Skipped | None = None):
    """King James Bible, a verse a row: text, book, chapter, verse, citation.

    Held out deterministically by chapter: chapter number k (counted 0.. through the whole
    Bible in order) is "test" when k % test_every == test_every - 1 (59 of 1189 at 20).
    split: "train", "test" or "all".
    """
    _split_names(split, ("train", "test", "all"))
    skipped = Skipped() if skipped is None else skipped
    src = Path(path) if path is not None else asset_path("kjv")
    rows = read_text_lines(src, on_error, skipped)
    _report(skipped, str(src))
    if split != "all":
        k, last, keep = -1, None, []
        for r in rows:
            ch = (r.get("book"), r.get("chapter"))
            if ch != last:
                k, last = k + 1, ch
            if (k % test_every == test_every - 1) == (split == "test"):
                keep.append(r)
        rows = keep
    return _text_dataset(rows)


def text_file(path, split: str = "all", test_every: int = 20, on_error: str = "raise",
              skipped: Skipped | None = None):
    """A user text corpus (.txt: a line each; .jsonl: {"text": ...}); test = every test_every-th line."""
    _split_names(split, ("train", "test", "all"))
    skipped = Skipped() if skipped is None else skipped
    rows = read_text_lines(path, on_error, skipped)
    _report(skipped, str(path))
    if split != "all":
        rows = [r for i, r in enumerate(rows) if (i % test_every == test_every - 1) == (split == "test")]
    return _text_dataset(rows)


# ----------------------------------------------------------------------------- images

def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """The ADM (guided-diffusion) centre crop: BOX halvings while the short side >= 2*size,
    BICUBIC so the short side == size, then the centre square. -> (size,size,C) uint8."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def load_image(src, size: int | None = 256, crop: str = "adm", name=None) -> np.ndarray:
    """Decode an image file (path, bytes or file object) -> uint8 (3,size,size).

    crop="adm": the ADM centre crop to `size`; crop="none": the image must already be
    size x size (any size if size is None). Raises DataError naming the file otherwise.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or (src if isinstance(src, (str, os.PathLike)) else "<image bytes>")
    if crop not in ("adm", "none"):
        raise ValueError(f"crop must be 'adm' or 'none', got {crop!r}")
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise DataError(f"{name}: image file does not exist")
    try:
        with Image.open(src) as im:
            im.load()  # decodes everything: a truncated file fails here
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if min(w, h) < 1:
        raise DataError(f"{name}: image is {w}x{h}")
    if crop == "adm":
        if size is None:
            raise ValueError("crop='adm' needs a size")
        arr = center_crop_arr(img, size)  # (S,S,3)
    else:
        if size is not None and (w, h) != (size, size):
            raise DataError(f"{name}: image is {w}x{h}, expected {size}x{size} (use crop='adm' to resize)")
        arr = np.asarray(img)  # (H,W,3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3,S,S)


class _ImageTransform:
    """Lazy decoding of an image index (path or {"bytes","path"} column) on access."""

    def __init__(self, size, crop, column="path"):
        self.size, self.crop, self.column = size, crop, column

    def __call__(self, batch):
        images = []
        for ref in batch[self.column]:
            if isinstance(ref, dict):  # a datasets Image(decode=False) cell
                images.append(load_image(ref.get("bytes") or ref.get("path"), self.size, self.crop,
                                         name=ref.get("path") or "<image bytes>"))
            else:
                images.append(load_image(ref, self.size, self.crop))
        out = {"image": np.stack(images) if images else np.zeros((0, 3, self.size or 0, self.size or 0), np.uint8)}
        out["label"] = np.asarray(batch["label"], np.int64)
        if self.column == "path":
            out["path"] = batch["path"]
        return out


def _index_to_dataset(index, decode: Callable, column: str, item_features, eager: bool, on_error: str,
                      skipped: Skipped, what: str, transform):
    """An index dataset -> lazy (decoded on access) or eager (decoded now, bad items skipped)."""
    from datasets import Dataset, Features
    from tqdm.auto import tqdm

    _check_on_error(on_error)
    if not eager:
        if on_error == "skip":
            raise ValueError(f"{what}: on_error='skip' needs eager=True (a lazy dataset decodes on access "
                             "and can only raise DataError there)")
        return index.with_transform(transform)
    rows: dict[str, list] = {k: [] for k in item_features}
    for i in tqdm(range(len(index)), desc=f"decoding {what}", disable=len(index) < 50):
        ex = index[i]
        ref = ex[column]
        name = ref.get("path") if isinstance(ref, dict) else ref
        try:
            value = decode(ref)
        except DataError as e:
            _bad(on_error, skipped, name or f"{what}[{i}]", str(e).removeprefix(f"{name}: "))
            continue
        rows[next(iter(item_features))].append(value)
        for k in list(item_features)[1:]:
            rows[k].append(ex[k] if k in ex else name)
    _report(skipped, what)
    return _numpy(Dataset.from_dict(rows, features=Features(item_features)))


def image_folder(root, split: str | None = None, size: int = 256, crop: str = "adm", eager: bool = False,
                 on_error: str = "raise", skipped: Skipped | None = None):
    """ImageFolder layout: <root>[/<split>]/<class>/<image>. Labels follow sorted class names
    (as torchvision's ImageFolder and ADM). -> image uint8 (3,size,size), label, path."""
    from datasets import Array3D, ClassLabel, Dataset, Features, Value

    _check_on_error(on_error)
    skipped = Skipped() if skipped is None else skipped
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image directory does not exist")
    if split and (root / split).is_dir():
        root = root / split
    elif split:  # <root> read as the split itself: refused where it holds other splits' folders
        others = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_NAMES)
        if others:
            raise DataError(f"{root}: no {split!r} folder (it has {', '.join(others)}); name the split's folder "
                            f"or pass one of those splits")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected <root>/<class>/<image>; ImageNet's val images "
                        "must first be moved into class folders)")
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(i)
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its {len(classes)} class folders")
    label_feat = ClassLabel(names=classes)
    index = Dataset.from_dict({"path": paths, "label": labels},
                              features=Features({"path": Value("string"), "label": label_feat}))
    feats = {"image": Array3D((3, size, size), "uint8"), "label": label_feat, "path": Value("string")}
    return _index_to_dataset(index, lambda p: load_image(p, size, crop), "path", feats, eager, on_error, skipped,
                             str(root), _ImageTransform(size, crop))


def _hf_files(p: Path) -> bool:
    """Whether a directory is a HuggingFace dataset snapshot: data files at its top or in data/."""
    kinds = {".parquet", ".arrow", ".jsonl", ".csv"}
    top = (f for f in p.iterdir() if f.is_file())
    data = (p / "data").rglob("*") if (p / "data").is_dir() else ()
    return any(f.suffix in kinds for f in top) or any(f.suffix in kinds and f.is_file() for f in data)


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists())


def load_hf(name_or_path, split: str = "train", allow_download: bool = False):
    """A HuggingFace dataset split: a save_to_disk directory, local data files/dirs (load_dataset),
    or, only with allow_download=True, a hub name."""
    import datasets

    p = Path(str(name_or_path)).expanduser()
    try:
        if _is_saved_dataset(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split {split!r}; it has {', '.join(ds)}")
                ds = ds[split]
            return ds
        if p.exists():
            return datasets.load_dataset(str(p), split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{p}: could not load as a HuggingFace dataset ({type(e).__name__}: {e})") from None
    if not allow_download:
        raise DataError(f"{name_or_path}: no such local path. Datasets are never downloaded by default; "
                        "download it yourself (datasets.load_dataset(...).save_to_disk(dir)) and pass the "
                        "directory, or pass allow_download=True")
    return datasets.load_dataset(str(name_or_path), split=split)


def hf_images(name_or_path, split: str = "train", size: int = 256, crop: str = "adm",
              image_column: str | None = None, label_column: str | None = None, eager: bool = False,
              allow_download: bool = False, on_error: str = "raise", skipped: Skipped | None = None):
    """An image dataset in HuggingFace form -> image uint8 (3,size,size), label (-1 if none), path."""
    from datasets import Array3D, Features, Image, Value

    _check_on_error(on_error)
    skipped = Skipped() if skipped is None else skipped
    ds = load_hf(name_or_path, split, allow_download)
    feats = ds.features
    if image_column is None:
        image_column = next((k for k, f in feats.items() if isinstance(f, Image)), None)
        image_column = image_column or next((k for k in ("image", "img") if k in feats), None)
    if image_column not in feats:
        raise DataError(f"{name_or_path}: no image column (columns: {', '.join(feats)}); pass image_column=")
    if label_column is None:
        label_column = next((k for k in ("label", "labels", "class") if k in feats), None)
    if isinstance(feats[image_column], Image):
        ds = ds.cast_column(image_column, Image(decode=False))  # we decode, to report bad files ourselves
    keep = [image_column] + ([label_column] if label_column else [])
    ds = ds.select_columns(keep).rename_column(image_column, "ref")
    if label_column:
        ds = ds.rename_column(label_column, "label") if label_column != "label" else ds
        label_feat = ds.features["label"]
    else:
        ds = ds.add_column("label", [-1] * len(ds))
        label_feat = Value("int64")

    def decode(ref):
        if isinstance(ref, dict):
            return load_image(ref.get("bytes") or ref.get("path"), size, crop, name=ref.get("path") or "<image bytes>")
        return load_image(ref, size, crop)

    item = {"image": Array3D((3, size, size), "uint8"), "label": label_feat, "path": Value("string")}

    def transform(batch):
        out = _ImageTransform(size, crop, column="ref")(batch)
        out["path"] = [r.get("path") if isinstance(r, dict) else r for r in batch["ref"]]
        return out

    return _index_to_dataset(ds, decode, "ref", item, eager, on_error, skipped, str(name_or_path), transform)


def imagenet(root, split: str = "train", size: int = 256, **kw):
    """ImageNet with the ADM centre crop: an ImageFolder directory (<root>/<split>/<wnid>/*.JPEG
    or <root>/<wnid>/*.JPEG) or a HuggingFace dataset (save_to_disk dir, local files, or a hub
    name with allow_download=True). -> image uint8 (3,size,size), label, path."""
    p = Path(str(root)).expanduser()
    if p.is_dir() and not _is_saved_dataset(p):
        sub = p / split if (p / split).is_dir() else p
        if sub is p and any(d.is_dir() and d.name in SPLIT_NAMES for d in p.iterdir()):
            kw.pop("allow_download", None)
            return image_folder(p, split, size, **kw)  # which names the splits it has
        # class folders (images inside, at any depth), unless it is a dataset snapshot (parquet / arrow files)
        has_classes = any(d.is_dir() and not d.name.startswith(".") for d in sub.iterdir()) and not _hf_files(sub)
        if has_classes:
            kw.pop("allow_download", None)
            return image_folder(p, split, size, **kw)
    if not p.exists() and not kw.get("allow_download"):
        raise DataError(f"{p}: ImageNet directory does not exist (expected <root>/{split}/<class>/<image> or a "
                        "HuggingFace dataset saved with save_to_disk)")
    return hf_images(root, split, size, **kw)


# ----------------------------------------------------------------------------- video

def _resize_frame(img, size):
    """PIL image -> uint8 (H,W,3): None keeps it, an int centre-crops a size x size square (ADM
    crop), (h, w) resizes to exactly that."""
    from PIL import Image

    if size is None:
        return np.asarray(img)
    if isinstance(size, int):
        return center_crop_arr(img, size)
    h, w = size
    return np.asarray(img.resize((w, h), resample=Image.BICUBIC))


def decode_video(path, frames: int | None = None, stride: int = 1, start: int | float | str = 0,
                 size: int | tuple[int, int] | None = None, short: str = "raise") -> tuple[np.ndarray, float]:
    """Decode a video with PyAV -> (uint8 (T,H,W,3) RGB, fps).

    frames=None decodes every stride-th frame from `start` to the end (and checks that the
    container's reported frame count was all there); otherwise exactly `frames` frames
    start, start+stride, ... (start="center" centres the span; a float u in [0, 1) starts at
    u x the last start that fits: a random temporal crop for a random u). A missing or unreadable
    file raises DataError naming it; so does a clip shorter than the span, unless short="spread":
    then `frames` frames evenly spaced over the whole clip (as Latte's loader does).
    """
    if short not in ("raise", "spread"):
        raise ValueError(f"short must be 'raise' or 'spread', got {short!r}")
    try:
        return _decode_video(path, frames, stride, start, size)
    except _TooShort as e:
        if short == "raise":
            raise DataError(str(e)) from None
        every, fps = _decode_video(path, None, 1, 0, size)  # (n, H, W, 3): a short clip, all of it
        pick = np.linspace(0, len(every) - 1, frames).round().astype(int)
        return every[pick], fps


class _TooShort(DataError):
    pass


def _decode_video(path, frames, stride, start, size) -> tuple[np.ndarray, float]:
    import av

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: video file does not exist")
    if stride < 1 or (frames is not None and frames < 1):
        raise ValueError(f"need stride >= 1 and frames >= 1, got stride={stride}, frames={frames}")
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot open as a video: corrupt, truncated or not a video file "
                        f"({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise DataError(f"{p}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        reported = stream.frames or 0
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        span = None if frames is None else (frames - 1) * stride + 1
        if start == "center":
            start = max(0, (reported - span) // 2) if span and reported else 0
        elif isinstance(start, float):
            if not 0.0 <= start < 1.0:
                raise ValueError(f"a fractional start must lie in [0, 1), got {start}")
            start = int(start * (reported - span + 1)) if span and reported > span else 0
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, a float in [0, 1) or 'center', got {start!r}")
        last = None if span is None else start + span - 1
        out, n = [], 0
        try:
            for n, frame in enumerate(container.decode(stream), 1):
                i = n - 1
                if i >= start and (i - start) % stride == 0:
                    rgb = frame.to_ndarray(format="rgb24") if size is None else _resize_frame(frame.to_image(), size)
                    out.append(rgb)  # (H,W,3)
                if last is not None and i >= last:
                    break
        except (av.FFmpegError, OSError) as e:
            raise DataError(f"{p}: decoding failed after {n} frames ({type(e).__name__}: {e})") from None
    if span is not None and n < start + span:
        raise _TooShort(f"{p}: has only {n} decodable frames; {frames} frames at stride {stride} from frame {start} "
                        f"need {start + span}")
    if span is None and reported and n < reported:
        raise DataError(f"{p}: truncated, decoded {n} of the {reported} frames its container reports")
    if not out:
        raise DataError(f"{p}: no frames decoded")
    return np.stack(out), fps  # (T,H,W,3)


def _reshape_videos(batch):
    """Transform of a ragged video table: flat uint8 + shape -> (T,H,W,3) arrays."""
    out = {k: v for k, v in batch.items() if k not in ("video", "shape")}
    out["video"] = [np.asarray(v, np.uint8).reshape([int(d) for d in s]) for v, s in zip(batch["video"], batch["shape"])]
    return out


def _video_dataset(rows: dict[str, list], extra):
    """Videos of one shape -> Array4D column; of different shapes -> flat uint8 + shape columns
    built straight in Arrow, reshaped on access."""
    import pyarrow as pa
    from datasets import Array4D, Dataset, Features

    shapes = {v.shape for v in rows["video"]}
    if len(shapes) <= 1:
        shape = shapes.pop() if shapes else (0, 0, 0, 3)
        feats = Features({"video": Array4D((None,) + shape[1:], "uint8"), **extra})
        return _numpy(Dataset.from_dict(rows, features=feats))
    sizes = np.array([v.size for v in rows["video"]], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]))
    flat = pa.array(np.concatenate([v.reshape(-1) for v in rows["video"]]))
    table = {"video": pa.LargeListArray.from_arrays(offsets, flat),
             "shape": pa.array([list(v.shape) for v in rows["video"]], pa.list_(pa.int64()))}
    table.update({k: pa.array(v) for k, v in rows.items() if k != "video"})
    return Dataset(pa.table(table)).with_transform(_reshape_videos)


def video_clips(split: str = "all", names: Sequence[str] | None = None, frames: int | None = 16, stride: int = 1,
                start: int | str = 0, size: int | tuple[int, int] | None = None, on_error: str = "raise",
                skipped: Skipped | None = None):
    """The real H.264 clips shipped by the offline carrier (assets.VIDEO_ASSETS), or any video
    paths given in `names`. -> video uint8 (T,H,W,3), name, fps, path. Every split is the whole set."""
    from datasets import Value

    _check_on_error(on_error)
    skipped = Skipped() if skipped is None else skipped
    names = list(names) if names is not None else list(VIDEO_ASSETS)
    rows = {"video": [], "name": [], "fps": [], "path": []}
    for name in names:
        path = asset_path(name) if name in VIDEO_ASSETS else Path(name)
        try:
            video, fps = decode_video(path, frames, stride, start, size)
        except DataError as e:
            _bad(on_error, skipped, path, str(e).removeprefix(f"{path}: "))
            continue
        rows["video"].append(video)
        rows["name"].append(name if name in VIDEO_ASSETS else Path(name).stem)
        rows["fps"].append(fps)
        rows["path"].append(str(path))
    _report(skipped, "video_clips")
    return _video_dataset(rows, {"name": Value("string"), "fps": Value("float64"), "path": Value("string")})


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def ucf101_splits(root, split: str = "train", fold: int = 1, splits_dir=None) -> tuple[list[str], list[int], list[str]]:
    """UCF-101 split lists -> (video paths, labels = classInd index - 1, class names)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: UCF-101 directory does not exist")
    _split_names(split, ("train", "test"))
    if fold not in (1, 2, 3):
        raise ValueError(f"UCF-101 fold must be 1, 2 or 3, got {fold}")
    cands = [Path(splits_dir)] if splits_dir else [root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist"]
    lists = next((c for c in cands if (c / "classInd.txt").exists()), None)
    if lists is None:
        raise DataError(f"{root}: no ucfTrainTestlist/classInd.txt (looked in {', '.join(map(str, cands))}); "
                        "unpack UCF101TrainTestSplits-RecognitionTask.zip there or pass splits_dir=")
    classes: dict[str, int] = {}
    for n, line in _read_lines(lists / "classInd.txt"):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{lists / 'classInd.txt'}:{n}: expected '<index> <ClassName>', got {line!r}")
        classes[parts[1]] = int(parts[0]) - 1
    names = [c for c, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    if sorted(classes.values()) != list(range(len(classes))):
        raise DataError(f"{lists / 'classInd.txt'}: class indices are not 1..{len(classes)}")
    list_file = lists / f"{split}list0{fold}.txt"
    if not list_file.exists():
        raise DataError(f"{list_file}: split list does not exist")
    paths, labels = [], []
    for n, line in _read_lines(list_file):
        rel = line.split()[0]
        cls = rel.replace("\\", "/").split("/")[0]
        if cls not in classes:
            raise DataError(f"{list_file}:{n}: class {cls!r} of {rel!r} is not in classInd.txt")
        path = root / rel
        if not path.exists() and (root / Path(rel).name).exists():
            path = root / Path(rel).name  # flat layout
        paths.append(str(path))
        labels.append(classes[cls])
    return paths, labels, names


def ucf101(root, split: str = "train", fold: int = 1, frames: int = 16, stride: int = 1, start: int | str = 0,
           size: int | tuple[int, int] = 64, eager: bool = False, splits_dir=None, on_error: str = "raise",
           skipped: Skipped | None = None, short: str = "spread"):
    """UCF-101 (<root>/<Class>/v_<Class>_gXX_cYY.avi + ucfTrainTestlist/) -> video uint8 (T,S,S,3)
    of `frames` frames at `stride` (PyAV), label (classInd index - 1), path. A clip shorter than the
    span gives its frames evenly spaced (short="spread"; the shortest UCF-101 clips have 29 frames,
    fewer than 16 at stride 3 need), or raises (short="raise")."""
    from datasets import Array4D, ClassLabel, Dataset, Features, Value

    _check_on_error(on_error)
    skipped = Skipped() if skipped is None else skipped
    paths, labels, names = ucf101_splits(root, split, fold, splits_dir)
    label_feat = ClassLabel(names=names)
    index = Dataset.from_dict({"path": paths, "label": labels},
                              features=Features({"path": Value("string"), "label": label_feat}))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    item = {"video": Array4D((frames,) + hw + (3,), "uint8"), "label": label_feat, "path": Value("string")}

    def decode(p):
        return decode_video(p, frames, stride, start, size, short)[0]  # (T,S,S,3)

    def transform(batch):
        return {"video": np.stack([decode(p) for p in batch["path"]]),
                "label": np.asarray(batch["label"], np.int64), "path": batch["path"]}

    return _index_to_dataset(index, decode, "path", item, eager, on_error, skipped, f"UCF-101 {split}", transform)


# ----------------------------------------------------------------------------- latent caches

def latent_cache_info(path) -> dict:
    """The meta.json written by tokenizers/cache_latents.py."""
    p = Path(path).expanduser()
    meta = p / "meta.json"
    if not meta.exists():
        raise DataError(f"{p}: not a latent cache (no meta.json); build one with tokenizers/cache_latents.py")
    try:
        return json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta}: unreadable ({e})") from None


def load_latent_cache(path):
    """A latent cache directory -> Dataset: latent float (c,h,w) or (T,c,h,w), label int64,
    and latent_flip (the horizontally flipped image's latents) when cached. Memory-mapped."""
    from datasets import concatenate_datasets, load_from_disk

    p = Path(path).expanduser()
    info = latent_cache_info(p)
    shards = [p / s for s in info.get("shards", [])]
    missing = [str(s) for s in shards if not s.is_dir()]
    if not shards or missing:
        raise DataError(f"{p}: latent cache shards missing: {', '.join(missing) or 'none listed'}")
    ds = concatenate_datasets([load_from_disk(str(s)) for s in shards])
    if len(ds) != info.get("count", len(ds)):
        raise DataError(f"{p}: has {len(ds)} rows, meta.json says {info['count']}")
    return _numpy(ds)


def check_latent_cache(path, codec=None, latent_channels: int | None = None) -> dict:
    """A latent cache's meta.json checked against the codec that decodes what is trained on it (latent
    channels, downsampling, scaling and shift factors, and the VAE's file fingerprint where both record
    one) and against the model's latent channels. Returns the meta."""
    info = latent_cache_info(path)
    bad = []
    if latent_channels is not None and info.get("latent_channels") != latent_channels:
        bad.append(f"latent_channels {info.get('latent_channels')} (the model takes {latent_channels})")
    if codec is not None:
        for key in ("latent_channels", "downsample"):
            if key in info and info[key] != getattr(codec, key):
                bad.append(f"{key} {info[key]} (the codec's: {getattr(codec, key)})")
        for key, default in (("scaling_factor", 1.0), ("shift_factor", 0.0)):
            if key in info and not math.isclose(float(info[key]), float(getattr(codec, key, default)), rel_tol=1e-6):
                bad.append(f"{key} {info[key]} (the codec's: {getattr(codec, key, default)})")
        mine = codec.fingerprint() if hasattr(codec, "fingerprint") else None
        if info.get("vae_sha256") and mine and info["vae_sha256"] != mine:
            bad.append(f"VAE {info.get('vae')} (sha256 {info['vae_sha256'][:12]}), not the codec's {codec.path} "
                       f"(sha256 {mine[:12]})")
    if bad:
        raise DataError(f"{path}: the latent cache does not match: {'; '.join(bad)}. Cache the data again with "
                        f"this VAE (tokenizers/cache_latents.py) or point task.vae_path at the cache's VAE")
    return info


class LatentDataset:
    """torch-style map dataset over a latent cache: (latent float tensor, label int).

    With a flipped copy cached, each access takes it with probability flip_p (seeded per
    index and epoch via set_epoch, so runs are reproducible)."""

    def __init__(self, path, flip_p: float = 0.5, seed: int = 0):
        self.ds = load_latent_cache(path)
        self.info = latent_cache_info(path)
        self.has_flip = "latent_flip" in self.ds.column_names
        self.flip_p, self.seed, self.epoch = flip_p, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        import torch

        row = self.ds[int(i)]
        z = row["latent"]
        if self.has_flip and self.flip_p > 0:
            u = np.random.default_rng((self.seed, self.epoch, int(i))).random()
            z = row["latent_flip"] if u < self.flip_p else z
        return torch.from_numpy(np.asarray(z, np.float32)), int(row["label"])


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable] = {
    "mnist": mnist,
    "moving_mnist": moving_mnist,
    "kjv": kjv,
    "text": text_file,
    "video_clips": video_clips,
    "imagenet": imagenet,
    "image_folder": image_folder,
    "hf_images": hf_images,
    "ucf101": ucf101,
    "latents": lambda path, split="train": load_latent_cache(path),
}


def build_dataset(name: str, split: str = "train", **kw):
    """The one entry point: a registered name (DATASETS) or a local path.

    Paths: a .txt/.jsonl file -> text_file; a directory with ucfTrainTestlist -> ucf101;
    a latent cache (meta.json) -> load_latent_cache; any other directory -> imagenet
    (ImageFolder or a saved HuggingFace dataset)."""
    if name in DATASETS:
        return DATASETS[name](split=split, **kw)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix in (".txt", ".jsonl", ".json"):
        return text_file(p, split=split, **kw)
    if p.is_dir():
        if (p / "meta.json").exists():
            return load_latent_cache(p)
        if (p / "ucfTrainTestlist").is_dir():
            return ucf101(p, split=split, **kw)
        return imagenet(p, split=split, **kw)
    raise DataError(f"unknown dataset {name!r}: not one of {', '.join(DATASETS)} and not an existing path")
