"""Evaluate a checkpoint: its task's samples and metrics.

    python evaluate.py runs/mnist_class_tiny                      # the run's latest checkpoint, EMA weights
    python evaluate.py runs/mnist_class_tiny/step_0002000 --no-ema --out eval_raw
    python evaluate.py runs/mnist_class_tiny task.eval_samples=10000 task.fid=True   # Inception FID / PR (+ IS with task.inception_path=inception-2015-12-05.pt)
    python evaluate.py ckpt/acdit-h-imagenet --samples 50000 --reference /data/imagenet/train   # converted official

Under torchrun or accelerate launch, the processes share the sampling out (each writes its batches to
<out>/.samples/, process 0 computes the metrics; the samples are those of one process), so that a
50,000-sample FID set takes 1/W of the time; a killed evaluation run again with the same command makes
only the batches that are missing:

    torchrun --nproc_per_node 8 evaluate.py ckpt/acdit-xl-imagenet --samples 50000 --reference /data/imagenet/train

What is measured is the task's: generation tasks write PNG grids (GIF/MP4 for video), an
ADM-compatible samples.npz and metrics.json (MNIST classifier accuracy and Frechet distance,
Inception FID / precision / recall and, with an Inception file that has the classifier head, IS; FVD); classification writes top-1; text, perplexity.
Overrides are dotted key=value pairs on the run's saved configuration (unknown keys fail).
Weights are read from safetensors only; nothing in a checkpoint is ever unpickled.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from unimodal import checkpoint as ckpt
from unimodal import shards
from unimodal.config import apply_overrides, int_at_least, replace_strict, resolve_precision


def launch(device: str) -> tuple[int, int, str]:
    """(rank, world, device) of this process: under torchrun / accelerate launch (WORLD_SIZE > 1), accelerate
    sets up the process group (gloo on CPU, NCCL on GPUs) and picks the device; else (0, 1, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator
        acc = Accelerator(cpu=device == "cpu")
        return acc.process_index, acc.num_processes, str(acc.device)
    return 0, 1, device


def evaluate_run(path: str | Path, out: str | Path | None = None, ema: bool = True, quick: bool = False,
                 overrides: list[str] | None = None, device: str = "cpu") -> dict:
    """Evaluate a checkpoint written by train.py; under a distributed launch, the metrics on process 0 and {}
    on the others."""
    from tasks import build_task
    from train import config_from_dict
    c = ckpt.resolve(path)
    cfg = apply_overrides(config_from_dict(ckpt.load_config(c)), overrides or [])
    rank, world, device = launch(device)
    cfg = replace_strict(cfg, precision=resolve_precision(cfg.precision, device))
    task = build_task(cfg, rank, world, device)
    if rank != 0 and not task.sharded_eval:  # a task that does not share its evaluation out: process 0's
        return {}
    model = task.build_model()
    use_ema = ema and (c / "ema.safetensors").is_file()
    missing, unexpected = model.load_state_dict(ckpt.load_weights(c, ema=use_ema), strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{c}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    # default: beside the run's checkpoints, where pruning does not reach (a lone checkpoint: inside it)
    where = c.parent / "evaluations" / c.name if (c.parent / "latest").exists() else c
    out = Path(out) if out else where / ("eval_ema" if use_ema else "eval")
    metrics = task.evaluate(model, out, quick=quick)
    if rank != 0:
        return {}
    metrics["checkpoint"], metrics["weights"] = str(c), "ema" if use_ema else "model"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def evaluate_converted(path: str | Path, out: str | Path, samples: int, batch: int, reference: str | None,
                       vae: str | None, cfg_scale: float | None, steps: int | None, device: str,
                       inception: str | None, reference_count: int = 0, frame_stride: int = 3, fold: int = 1) -> dict:
    """Class-conditional sampling (and FID/IS/PR or FVD against a reference set) for a checkpoint
    converted from the official ACDiT release by `python -m unimodal.convert`. reference: an ADM reference
    batch .npz or an image dataset (its training split: `reference_count` images in a fixed random order, 0
    for all), or a video dataset (2048 clips, or `reference_count`, `frame_stride` frames apart)."""
    from unimodal import data as D
    from unimodal import metrics as M
    from unimodal.codecs import VAECodec
    from unimodal.convert import load_converted
    from unimodal.sampling import row_generators
    from unimodal.visualize import save_image_grid, save_video_grid, to_uint8
    if reference:  # before sampling: a reference without pixels fails at once
        M.check_reference_source(reference)
    rank, world, device = launch(device)
    model, info = load_converted(path, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codec = VAECodec(vae or info.config["sampling"].get("vae_path"), device=device)
    net = None  # before sampling: a missing network fails at once
    if reference and rank == 0:
        net = M.InceptionFeatures(inception, device=device) if info.kind == "image" else M.I3DFeatures(device=device)
    n_cls = model.cfg.num_classes
    labels = torch.arange(samples) % n_cls

    def make(first: int, count: int) -> np.ndarray:  # sample j from its own generator
        z = info.generate(model, labels[first:first + count], cfg_scale=cfg_scale, steps=steps,
                          generator=row_generators(0, count, first))
        return to_uint8(codec.decode(z.to(device).float()))

    tag = shards.weights_tag(model, samples=samples, cfg_scale=cfg_scale, steps=steps, vae=codec.path,
                             sampling=info.config["sampling"])
    x = shards.sample_set(make, samples, batch, out, tag)  # (N, C, H, W) or (N, T, C, H, W), on process 0
    if x is None:
        return {}
    metrics: dict = {"samples": samples}
    if x.ndim == 4:
        np.savez(out / "samples.npz", arr_0=x.transpose(0, 2, 3, 1), labels=labels.numpy())
        save_image_grid(torch.from_numpy(x[:64]).float() / 127.5 - 1, out / "grid.png", nrow=8)
        if reference:
            ref = M.image_reference(net, reference, x.shape[-1], count=reference_count)
            metrics.update(M.image_metrics(net, x.transpose(0, 2, 3, 1), ref))
            metrics["reference"], metrics["reference_images"] = str(reference), int(ref["count"])
    else:
        save_video_grid(torch.from_numpy(x[:16]).float() / 127.5 - 1, out / "grid.gif", nrow=4)
        if reference:
            ref = M.video_reference(net, reference, frames=x.shape[1], size=x.shape[-1], stride=frame_stride,
                                    fold=fold, count=reference_count or 2048)
            fake = x.transpose(0, 1, 3, 4, 2)  # (N, T, H, W, 3)
            metrics["fvd"] = M.frechet_distance(*M.feature_stats(net(fake)), ref["mu"], ref["sigma"])
            metrics["reference"], metrics["reference_clips"] = str(reference), int(ref["count"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shards.done(out, tag, samples, batch)
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory, a run directory (its latest checkpoint), "
                                       "or a directory written by `python -m unimodal.convert`")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the saved configuration")
    ap.add_argument("--out", default=None, help="where to write samples and metrics (default: inside the checkpoint)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--quick", action="store_true", help="a small evaluation (fewer samples)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs (default: cuda when available; under torchrun, each process's own)")
    g = ap.add_argument_group("sampling (a run's task settings, or a converted checkpoint's)")
    g.add_argument("--samples", type=int_at_least(1), default=None, help="number of class-balanced samples "
                   "(task.eval_samples; 1000 for converted checkpoints)")
    g.add_argument("--batch", type=int_at_least(1), default=None, help="samples per sampling batch (task.eval_batch; 50 for "
                   "converted checkpoints)")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (task.cfg_scale; default: the checkpoint's)")
    g.add_argument("--steps", type=int_at_least(1), default=None, help="solver steps per block (task.sample_steps; 25)")
    g = ap.add_argument_group("converted official checkpoints")
    g.add_argument("--reference", default=None, help="reference for FID / FVD: an ADM reference batch .npz "
                   "(VIRTUAL_imagenet256_labeled.npz, as DiT and ACDiT report), an image dataset (ImageFolder), or "
                   "the UCF-101 root")
    g.add_argument("--reference-count", type=int, default=None, help="images of a dataset reference, in a fixed "
                   "random order (default 0: all, as ADM's statistics); video clips (default 2048)")
    g.add_argument("--frame-stride", type=int, default=None, help="frame stride of the reference clips (default 3: "
                   "the UCF-101 setting of configs/ucf101_*.py)")
    g.add_argument("--fold", type=int, default=None, help="UCF-101 split fold of the reference clips (default 1)")
    g.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (the SD VAE)")
    g.add_argument("--inception", default=None, help="local TorchScript Inception file")
    args = ap.parse_intermixed_args(argv)
    flags = {"eval_samples": args.samples, "eval_batch": args.batch, "cfg_scale": args.cfg, "sample_steps": args.steps}
    c = Path(args.checkpoint)
    cfg_file = c / "config.json"
    try:
        converted = cfg_file.is_file() and json.loads(cfg_file.read_text()).get("format", "").startswith("unimodal-acdit")
    except (ValueError, AttributeError) as e:
        ap.error(f"{cfg_file} is not a config this program wrote: {e}")
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False, [])]  # noqa: E731
    if converted and given("overrides", "quick", "no_ema"):
        ap.error(f"{', '.join(given('overrides', 'quick', 'no_ema'))}: for checkpoints written by train.py; a "
                 f"converted checkpoint takes the sampling and reference flags")
    if not converted and given("reference", "reference_count", "frame_stride", "fold", "vae", "inception"):
        ap.error(f"{', '.join(given('reference', 'reference_count', 'frame_stride', 'fold', 'vae', 'inception'))}: for "
                 f"converted checkpoints; a training run's evaluation takes its task's settings as overrides, e.g. "
                 f"task.fid=True task.fid_reference=... task.inception_path=... (images) or task.fvd=True "
                 f"task.fvd_reference=... (video)")
    try:
        if converted:
            m = evaluate_converted(c, args.out or c / "eval", args.samples or 1000, args.batch or 50, args.reference,
                                   args.vae, args.cfg, args.steps, args.device, args.inception,
                                   args.reference_count or 0, args.frame_stride or 3, args.fold or 1)
        else:
            extra = [f"task.{k}={v}" for k, v in flags.items() if v is not None]
            m = evaluate_run(c, args.out, ema=not args.no_ema, quick=args.quick,
                             overrides=list(args.overrides) + extra, device=args.device)
        if shards.rank_world()[0] == 0:
            print(json.dumps(m, indent=2, default=str))
    except (ckpt.CheckpointError, FileNotFoundError, KeyError, TypeError, ValueError) as e:
        if os.environ.get("UNIMODAL_DEBUG") == "1":
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(2)
    finally:
        shards.leave_group()


if __name__ == "__main__":
    main()
