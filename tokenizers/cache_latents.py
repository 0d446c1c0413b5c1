"""Encode a dataset once through a codec into Arrow shards that training reads instead of pixels.

    python tokenizers/cache_latents.py --dataset mnist --dataset-kw '{"size": 32}' \\
        --codec vae --vae runs/vae-mnist-f4 --flip --out runs/latents/mnist-train
    python tokenizers/cache_latents.py --dataset imagenet --dataset-kw '{"root": "/data/imagenet"}' \\
        --codec vae --vae sd-vae-ft-ema --flip --dtype float16 --out runs/latents/in256

Each shard is a datasets save_to_disk directory with columns latent (c,h,w) or (T,c,h,w),
label, and with --flip latent_flip (the latents of the horizontally flipped input, a second
copy a loader may pick at random). meta.json, written last, lists the shards and the codec.
Read the result with unimodal.data.load_latent_cache(out) or unimodal.data.LatentDataset(out).
A run that stops before meta.json is written (a crash, a kill) continues from its last shard when
started again with the same arguments (progress.json records the shards written); with --sample,
batch b draws from a generator seeded by (--seed, b), so the continued cache equals an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from unimodal.config import int_at_least  # noqa: E402
from unimodal.codecs import PixelCodec, VAECodec  # noqa: E402
from unimodal.data import DataError, Skipped, build_dataset, image_batch, video_batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="a name from unimodal.data.DATASETS or a local path")
    p.add_argument("--split", default="train")
    p.add_argument("--dataset-kw", default="{}", help='JSON keyword arguments for the loader, e.g. \'{"size": 32}\'')
    p.add_argument("--codec", choices=["pixel", "vae"], default="vae")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (--codec vae)")
    p.add_argument("--sample", action="store_true", help="sample the VAE posterior instead of taking its mean")
    p.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped input")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images (or clips) encoded at once")
    p.add_argument("--shard-size", type=int_at_least(1), default=10000, help="rows per Arrow shard")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="encode only the first N items")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored latent dtype")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad item (corrupt image, truncated video): stop, or skip and count it")
    p.add_argument("--seed", type=int, default=0, help="generator seed for --sample")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the VAE runs")
    return p.parse_args(argv)


def _probe(ds) -> tuple[str, np.ndarray]:
    """The column to encode ("image" or "video") and one decodable value of it.

    Lazy datasets list their index columns, so the decoded row is what tells."""
    for i in range(len(ds)):
        try:
            row = ds[i]
        except DataError:
            continue
        for c in ("image", "video"):
            if c in row:
                return c, np.asarray(row[c])
        raise DataError(f"dataset has no image or video column (columns: {', '.join(row)})")
    raise DataError("dataset has no decodable item")


def _fetch(ds, col: str, lo: int, hi: int, on_error: str, skipped: Skipped):
    """Rows lo..hi as (column arrays, labels); with skip, bad rows are left out one by one."""
    try:
        batch = ds[lo:hi]
        return np.stack([np.asarray(v) for v in batch[col]]), np.asarray(batch.get("label", [-1] * (hi - lo)))
    except DataError:
        if on_error == "raise":
            raise
    xs, ys = [], []
    for i in range(lo, hi):
        try:
            row = ds[i]
        except DataError as e:
            skipped.add(f"item {i}", str(e))
            continue
        xs.append(np.asarray(row[col]))
        ys.append(row.get("label", -1))
    return (np.stack(xs) if xs else None), np.asarray(ys)


def _to_codec_input(x: np.ndarray, column: str) -> torch.Tensor:
    return image_batch(x) if column == "image" else video_batch(x)  # (B,C,H,W) or (B,T,C,H,W)


def cache_latents(ds, codec, out, flip: bool = False, batch_size: int = 64, shard_size: int = 10000,
                  dtype: str = "float32", on_error: str = "raise", limit: int | None = None,
                  meta: dict | None = None, generator: torch.Generator | None = None) -> dict:
    """Encode `ds` (image/video column + label) through `codec` into Arrow shards in `out`."""
    from datasets import Array3D, Array4D, Dataset, Features, Value

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    column, _ = _probe(ds)
    n = len(ds) if limit is None else min(limit, len(ds))
    skipped = Skipped()
    shards, buf, count, first, input_shape = [], {"latent": [], "label": []}, 0, 0, None
    if flip:
        buf["latent_flip"] = []
    settings = json.loads(json.dumps({"n": n, "batch_size": batch_size, "shard_size": shard_size, "flip": flip,
                                      "dtype": dtype, "codec": repr(codec), "meta": meta or {},
                                      "seed": generator.initial_seed() if generator is not None else None},
                                     default=str))
    progress = out / "progress.json"
    if progress.exists():
        done = json.loads(progress.read_text())
        if done["settings"] != settings:
            raise ValueError(f"{out} holds a partial cache made with other settings ({done['settings']}); pass "
                             f"--overwrite to start again")
        shards, count, first, input_shape = done["shards"], done["count"], done["next"], done["input_shape"]
        skipped.items = [tuple(i) for i in done["skipped"]]
        print(f"continuing {out}: {count} items in {len(shards)} shard(s) already written")

    def flush(next_item: int):
        nonlocal buf
        if not buf["label"]:
            return
        lat = np.concatenate(buf["latent"])  # (S,c,h,w) or (S,T,c,h,w)
        arr = Array3D if lat.ndim == 4 else Array4D
        feats = {"latent": arr(lat.shape[1:], dtype), "label": Value("int64")}
        cols = {"latent": lat, "label": np.concatenate(buf["label"]).astype(np.int64)}
        if flip:
            feats["latent_flip"] = arr(lat.shape[1:], dtype)
            cols["latent_flip"] = np.concatenate(buf["latent_flip"])
        name = f"shard-{len(shards):05d}"
        Dataset.from_dict(cols, features=Features(feats)).save_to_disk(str(out / name))
        shards.append(name)
        buf = {k: [] for k in buf}
        tmp = out / f".progress.json.{os.getpid()}"
        tmp.write_text(json.dumps({"settings": settings, "shards": shards, "count": count, "next": next_item,
                                   "skipped": skipped.items, "input_shape": input_shape}))
        os.replace(tmp, progress)

    t0 = time.time()
    for lo in tqdm(range(first, n, batch_size), desc=f"encoding {column}s", unit="batch",
                   initial=first // batch_size, total=-(-n // batch_size)):
        x, y = _fetch(ds, column, lo, min(lo + batch_size, n), on_error, skipped)
        if x is None:
            continue
        x = _to_codec_input(x, column)  # (B,C,H,W) or (B,T,C,H,W) in [-1,1]
        input_shape = list(x.shape[1:])
        kw = {} if isinstance(codec, PixelCodec) or generator is None else \
            {"generator": torch.Generator().manual_seed(generator.initial_seed() * 1_000_003 + lo // batch_size)}
        buf["latent"].append(codec.encode(x, **kw).numpy().astype(dtype))
        if flip:
            buf["latent_flip"].append(codec.encode(x.flip(-1), **kw).numpy().astype(dtype))
        buf["label"].append(y)
        count += len(y)
        if sum(len(b) for b in buf["label"]) >= shard_size:
            flush(lo + batch_size)
    flush(n)
    info = {"count": count, "shards": shards, "flip": flip, "dtype": dtype, "column": column,
            "latent_channels": codec.latent_channels, "downsample": codec.downsample,
            "codec": repr(codec), "vae_sha256": codec.fingerprint() if hasattr(codec, "fingerprint") else None,
            "input_shape": input_shape, "scaling_factor": getattr(codec, "scaling_factor", 1.0),
            "shift_factor": getattr(codec, "shift_factor", 0.0), "seconds": time.time() - t0,
            "skipped": skipped.items, **(meta or {})}
    tmp = out / f".meta.json.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out / "meta.json")  # atomic: a cache is complete once it has a meta.json
    progress.unlink(missing_ok=True)
    if skipped.count:
        print(skipped.summary())
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "meta.json").exists() or (args.overwrite and (out / "progress.json").exists()):
        if not args.overwrite:
            raise SystemExit(f"{out} already holds a latent cache; pass --overwrite to replace it")
        shutil.rmtree(out)
    try:
        kw = json.loads(args.dataset_kw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-kw {args.dataset_kw!r} is not a JSON object ({e}); e.g. '{{\"size\": 32}}'") from None
    ds = build_dataset(args.dataset, args.split, **kw)  # with --on-error skip, bad rows are left out as read
    if args.codec == "vae":
        if not args.vae:
            raise SystemExit("--codec vae needs --vae DIR (a local diffusers AutoencoderKL directory)")
        codec = VAECodec(args.vae, device=args.device, sample=args.sample, chunk_size=args.batch_size)
    else:
        col, first = _probe(ds)
        channels = 3 if (col == "image" and first.ndim == 3) or (col == "video" and first.ndim == 4) else 1
        codec = PixelCodec(channels)
    gen = torch.Generator().manual_seed(args.seed) if args.sample else None
    meta = {"dataset": args.dataset, "split": args.split, "dataset_kw": kw, "vae": args.vae}
    try:
        info = cache_latents(ds, codec, out, args.flip, args.batch_size, args.shard_size, args.dtype, args.on_error,
                             args.limit, meta, gen)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"cached {info['count']} items in {len(info['shards'])} shard(s) at {out} "
          f"({info['seconds']:.1f}s, {len(info['skipped'])} skipped)")
    return info


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # DataError, CodecError, a bad --dataset-kw: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
