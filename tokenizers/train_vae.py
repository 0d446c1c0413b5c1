"""Train a small diffusers AutoencoderKL on MNIST on the CPU and save it with save_pretrained.

    python tokenizers/train_vae.py                         # f4, 4 latent channels, ~4 minutes on 2 cores
    python tokenizers/train_vae.py --steps 200 --out runs/vae-quick

Digits are zero-padded from 28x28 to --resolution (32: f4 gives 8x8x4 latents, which split
into square blocks). The loss is MSE reconstruction + a small KL term. After training the
config's scaling_factor is set to 1/std of the posterior means on a sample of training
images (and shift_factor to their mean with --shift), the model is saved (config.json +
diffusion_pytorch_model.safetensors), reloaded through unimodal.codecs.VAECodec and its
reconstruction PSNR is measured on the MNIST test set (uint8, on the 28x28 digit area).
Use it with: VAECodec("<out>").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from unimodal.config import int_at_least  # noqa: E402
from unimodal.codecs import VAECodec  # noqa: E402
from unimodal.data import _pad, image_batch, mnist_arrays  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vae-mnist-f4", help="output directory for save_pretrained")
    p.add_argument("--block-out-channels", default="16,32,32",
                   help="encoder/decoder widths; n widths give a downsampling factor of 2^(n-1)")
    p.add_argument("--latent-channels", type=int_at_least(1), default=4)
    p.add_argument("--layers-per-block", type=int_at_least(1), default=1)
    p.add_argument("--resolution", type=int_at_least(28), default=32, help="pad the 28x28 digits to this size")
    p.add_argument("--steps", type=int_at_least(1), default=1200, help="optimizer steps")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--scale-images", type=int_at_least(2), default=2000, help="training images used to set scaling_factor")
    p.add_argument("--eval-images", type=int_at_least(1), default=10000, help="MNIST test images for the PSNR report")
    p.add_argument("--shift", action="store_true", help="also set shift_factor to the latent mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's own choice)")
    return p.parse_args(argv)


def build_vae(args):
    from diffusers import AutoencoderKL

    widths = tuple(int(c) for c in args.block_out_channels.split(","))
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=args.layers_per_block,
        norm_num_groups=math.gcd(*widths, 32), sample_size=args.resolution, mid_block_add_attention=False,
    )


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (N,...)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


@torch.no_grad()
def evaluate_psnr(codec, images: np.ndarray, resolution: int, batch_size: int = 250) -> float:
    """Mean PSNR of codec.decode(codec.encode(x)) on uint8 (N,28,28) digits, on the digit area."""
    off = (resolution - 28) // 2
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="PSNR", leave=False):
        x = image_batch(_pad(images[i:i + batch_size], resolution))  # (B,1,R,R)
        rec = codec.decode(codec.encode(x))  # (B,1,R,R)
        rec = ((rec[:, 0, off:off + 28, off:off + 28] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        scores.append(psnr_uint8(rec, images[i:i + batch_size]))
    return float(np.concatenate(scores).mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_x, _ = mnist_arrays("train")  # (60000,28,28) uint8
    test_x, _ = mnist_arrays("test")
    vae = build_vae(args)
    print(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
          f"f{2 ** (len(vae.config.block_out_channels) - 1)}, {args.latent_channels} latent channels")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(args.steps, 1)))))
    t0 = time.time()
    vae.train()
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        idx = rng.integers(0, len(train_x), args.batch_size)
        x = image_batch(_pad(train_x[idx], args.resolution))  # (B,1,R,R) in [-1,1]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample  # (B,1,R,R)
        mse = (rec - x).pow(2).mean()
        loss = mse + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    train_s = time.time() - t0

    vae.eval()
    with torch.no_grad():  # scaling factor: 1/std of posterior means on a sample of training images
        idx = rng.choice(len(train_x), min(args.scale_images, len(train_x)), replace=False)
        z = torch.cat([vae.encode(image_batch(_pad(train_x[idx[i:i + 250]], args.resolution))).latent_dist.mean
                       for i in range(0, len(idx), 250)])  # (S,c,h,w)
    shift = float(z.mean()) if args.shift else None
    scale = float(1.0 / (z - (shift or 0.0)).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    out = Path(args.out)
    vae.save_pretrained(out, safe_serialization=True)

    codec = VAECodec(out)  # the saved model, as users load it
    n_eval = min(args.eval_images, len(test_x))
    psnr = evaluate_psnr(codec, test_x[:n_eval], args.resolution)
    metrics = {"psnr_test": psnr, "eval_images": n_eval, "steps": args.steps, "train_seconds": train_s,
               "scaling_factor": scale, "shift_factor": shift, "latent_shape": [codec.latent_channels,
               args.resolution // codec.downsample, args.resolution // codec.downsample],
               "resolution": args.resolution}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved {out}: scaling_factor {scale:.4f}, latents {tuple(metrics['latent_shape'])}, "
          f"trained {train_s:.0f}s")
    print(f"RESULT mnist_test_psnr_db={psnr:.2f} images={n_eval}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # DataError, CodecError, a bad --dataset-kw: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
