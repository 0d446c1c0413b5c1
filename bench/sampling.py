"""Cached sampling vs full recomputation, against the FLOP ratio the paper's analysis predicts.

FLOP model (ACDiT section 4.3): each forward pass costs, per layer, 24 d^2 per token for the
dense layers (QKV 6, projection 2, MLP 16) plus 4 d per allowed (query, key) pair for
attention. With the KV cache a solver step of block k runs the B noised tokens of each
guidance stream (plus, on its first step, the previous block's pending clean tokens, once for
both streams) against a context of k B clean tokens; full recomputation runs the whole
sequence so far (k B clean + B noised, per stream) under the training mask. The predicted
speed-up is the ratio of these totals over the whole generation.

Part 1 prints measured wall-time ratios beside that prediction for a tiny config at 4, 16 and
64 blocks and an ACDiT-B-shaped config at 4 blocks (batch 16 with guidance, fp32). Part 2
prints cached sampling time against the number of blocks at total lengths 1k, 4k and 16k
tokens (the shape of the paper's Fig. 6). Part 3 prints images/s and sampling MFU (counted
FLOPs / time / the mean throughput of 2048^3 matmul windows in the same dtype interleaved with the
blocks, as this machine's matmul throughput drifts; fp32 windows for bf16 forced on a CPU without
native bf16) for both configs with guidance in bf16 (fp32
on CPUs without native bf16 matmuls, `--precision auto`) and model.compile=True, batch 8, 4 blocks
of 256 tokens.

    python bench/sampling.py            # about 25 minutes on a 2-core Zen 4 (over an hour on a Zen 3)
    python bench/sampling.py --quick    # smaller part 2
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import NAMES, Peak, out, yardstick, time_split, write_readme  # noqa: E402
from unimodal.config import PRECISIONS, ModelConfig, load_config, resolve_precision  # noqa: E402
from unimodal.model import ACDiT  # noqa: E402
from unimodal.sampling import SequenceSampler  # noqa: E402
from unimodal.sequence import PackSpec  # noqa: E402


def predicted_flops(n_blocks: int, block: int, steps: int, depth: int, d: int, cached: bool, streams: int = 1) -> float:
    """Total forward FLOPs of generating n_blocks blocks of `block` tokens with `steps` solver steps."""
    dense, attn = 24 * d * d, 4 * d
    total = 0.0
    for k in range(n_blocks):
        ctx = k * block  # committed clean tokens before block k
        for s in range(steps):
            if cached:
                pend = block if (k > 0 and s == 0) else 0  # the previous block's clean copy, committed now
                tokens = pend + streams * block  # clean tokens once, noised tokens per guidance stream
                # pending clean tokens see the cache before them and their own block (ctx in all);
                # each stream's noised tokens see all ctx clean tokens and their own block
                pairs = pend * ctx + streams * block * (ctx + block)
            else:
                tokens = streams * (ctx + block)
                clean_pairs = block * block * k * (k + 1) // 2  # block-causal over k clean blocks
                pairs = streams * (clean_pairs + block * (ctx + block))
            total += depth * (dense * tokens + attn * pairs)
    return total


def time_sampling(model, spec, labels, C, H, W, blk, steps, mode, cfg_scale, precision="fp32") -> float:
    s = SequenceSampler(model, spec, labels.shape[0], labels, cfg_scale=cfg_scale, steps=steps,
                        max_len=H * W + 64, generator=torch.Generator().manual_seed(0), mode=mode,
                        precision=precision)
    t0 = time.perf_counter()
    s.image(C, H, W, block=blk)
    return time.perf_counter() - t0


def tiny_model() -> ACDiT:
    """The demo's model (configs/mnist_class_tiny.py: depth 6, width 256, 4 heads, erf-GELU) on
    4-channel latents at patch 1."""
    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist_class_tiny.py").model
    cfg = dataclasses.replace(demo, latent_channels=4, patch_size=1, rope_max_pos=(16384, 16384, 16384))
    return ACDiT(cfg).eval()


def timed_blocks(model, spec, labels, steps: int, peak: Peak, precision: str) -> float:
    """Cached sampling (bf16 or fp32) with guidance of 32x32x4 latents in 4 blocks of 256; every block is
    preceded by a matmul window as long as the previous block. Returns the sampling time."""
    s = SequenceSampler(model, spec, labels.shape[0], labels, cfg_scale=1.5, steps=steps, max_len=32 * 32 + 64,
                        generator=torch.Generator().manual_seed(0), precision=precision)
    total, last = 0.0, 0.3
    blocks = s.stream_image(4, 32, 32, block=256)
    while True:
        peak.window(last)
        t0 = time.perf_counter()
        if next(blocks, None) is None:
            break
        last = time.perf_counter() - t0
        total += last
    return total


def part3(args, spec: PackSpec) -> tuple[str, float]:
    """Images/s and sampling MFU with guidance, in bf16 (or fp32 where `--precision auto` finds no native
    bf16); returns the last row's (name, MFU)."""
    prec = args.precision  # resolved in main
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    wcast = " (weights cast once)" if prec == "bf16" else ""
    out(f"\nPart 3: cached sampling throughput, {prec}{wcast}, model.compile=True, batch {args.mfu_batch}, "
        f"guidance 1.5 (2 streams), 4 blocks of 256 tokens (32x32x4 latents, patch 1), {args.mfu_steps} steps per "
        f"block; every block follows a 2048^3 {NAMES[yardstick(dtype)]} matmul window as long as the block")
    tiny = tiny_model()
    tiny.cfg = dataclasses.replace(tiny.cfg, compile=True)
    mfu_cfgs = [("tiny", tiny)]
    if not args.skip_b:
        mfu_cfgs.append(("ACDiT-B-shaped", ACDiT(ModelConfig.preset(
            "ACDiT-B", latent_channels=4, patch_size=1, num_classes=1000, compile=True)).eval()))
    rows = []
    for name, model in mfu_cfgs:
        labels = torch.arange(args.mfu_batch) % model.cfg.num_classes
        time_sampling(model, spec, labels, 4, 32, 32, 256, 2, "cache", 1.5, prec)  # compiles every pass shape
        peak = Peak(dtype)
        t = timed_blocks(model, spec, labels, args.mfu_steps, peak, prec)
        cfg = model.cfg
        flops = args.mfu_batch * predicted_flops(4, 256, args.mfu_steps, cfg.depth, cfg.hidden_size, True, streams=2)
        split = time_split(lambda: time_sampling(model, spec, labels, 4, 32, 32, 256, 2, "cache", 1.5, prec))
        rows.append((name, t, flops / t, peak, split))
        print(f"  {name}: {t:.1f} s", file=sys.stderr, flush=True)
    best = max(r[3].best for r in rows)
    out(f"FLOPs counted as in part 1 (dense layers + allowed attention pairs, both streams); MFU against the mean "
        f"throughput of the matmul windows between that row's blocks; 'vs best' against the fastest single "
        f"product of this part, {best / 1e12:.3f} TFLOP/s")
    for name, t, fps, peak, _ in rows:
        out(f"{name:<16} {t:>8.1f} s  {args.mfu_batch / t:>7.3f} images/s  {fps / 1e12:.3f} TFLOP/s  "
            f"peak {peak.mean / 1e12:.3f}  MFU {fps / peak.mean * 100:5.1f}%  vs best {fps / best * 100:5.1f}%")
    out("time split of the same sampling at 2 steps per block, profiled (self time of the ops; 'rest' = "
        "elementwise and compiled regions, norms, the solver, Python):")
    for name, *_, sp in rows:
        w = sp["wall"]
        out(f"  {name:<16} dense matmuls {sp['matmul'] / w * 100:4.1f}%   attention kernels "
            f"{sp['attention'] / w * 100:4.1f}%   rest {sp['rest'] / w * 100:4.1f}%")
    return rows[-1][0], rows[-1][2] / rows[-1][3].mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="solver steps per block in part 1")
    ap.add_argument("--batch", type=int, default=16, help="images per batch in part 1 (at batch 8 the 64-block "
                    "passes, 16 noised tokens per stream and row, are latency-bound on 2 cores)")
    ap.add_argument("--cfg", type=float, default=1.5, help="guidance scale in part 1 (1: one stream)")
    ap.add_argument("--fig6-steps", type=int, default=2, help="solver steps per block in part 2")
    ap.add_argument("--quick", action="store_true", help="part 2 at 1k and 4k tokens only")
    ap.add_argument("--skip-b", action="store_true", help="skip the ACDiT-B-shaped rows")
    ap.add_argument("--skip-mfu", action="store_true", help="skip part 3 (images/s and sampling MFU)")
    ap.add_argument("--mfu-steps", type=int, default=25, help="solver steps per block in part 3")
    ap.add_argument("--mfu-batch", type=int, default=8, help="images per batch in part 3")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="part 3's: bf16, fp32, or auto (bf16 where this CPU computes it natively, else fp32)")
    ap.add_argument("--only-mfu", action="store_true", help="run part 3 only (its RESULT line is the sampling MFU)")
    ap.add_argument("--readme", action="store_true", help="write this run's output into README.md's results")
    args = ap.parse_args()
    args.precision = resolve_precision(args.precision, "cpu")
    if args.only_mfu and (args.skip_mfu or args.readme):
        ap.error("--only-mfu runs part 3 alone: it cannot be combined with --skip-mfu or --readme")
    torch.manual_seed(0)
    spec = PackSpec(patch_size=1, latent_channels=4)
    streams = 2 if args.cfg != 1.0 else 1
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch}, guidance "
        f"{args.cfg:g} ({streams} stream{'s' if streams > 1 else ''}), {args.steps} solver steps")
    if args.only_mfu:
        mfu = part3(args, spec)
        out(f"RESULT sampling MFU, {mfu[0]} ({args.precision}, guidance, batch {args.mfu_batch}, against the interleaved matmul "
            f"peak): {mfu[1] * 100:.1f}% (target 25%)")
        return
    out("\nPart 1: full recomputation / cached sampling")
    out(f"{'config':<16} {'blocks':>6} {'tokens':>6} {'cached s':>9} {'recompute s':>11} {'measured':>9} "
          f"{'predicted':>9} {'ratio':>6}")
    rows = []
    configs = [("tiny", tiny_model(), 32, n) for n in (4, 16, 64)]
    if not args.skip_b:
        bcfg = ModelConfig.preset("ACDiT-B", latent_channels=4, patch_size=1, num_classes=1000)
        configs.append(("ACDiT-B-shaped", ACDiT(bcfg).eval(), 32, 4))
    for name, model, side, nb in configs:
        n = side * side
        blk = n // nb
        labels = torch.arange(args.batch) % model.cfg.num_classes
        tc = time_sampling(model, spec, labels, 4, side, side, blk, args.steps, "cache", args.cfg)
        tr = time_sampling(model, spec, labels, 4, side, side, blk, args.steps, "recompute", args.cfg)
        cfg = model.cfg
        pred = predicted_flops(nb, blk, args.steps, cfg.depth, cfg.hidden_size, False, streams) / \
            predicted_flops(nb, blk, args.steps, cfg.depth, cfg.hidden_size, True, streams)
        rows.append((tr / tc) / pred)
        out(f"{name:<16} {nb:>6} {n:>6} {tc:>9.2f} {tr:>11.2f} {tr / tc:>9.2f} {pred:>9.2f} {(tr / tc) / pred:>6.2f}")
    out(f"\nPart 2: cached sampling time vs number of blocks (tiny config, {args.fig6_steps} steps per block)")
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    model = tiny_model()
    out(f"{'tokens':>6} " + " ".join(f"{'blocks=' + str(b):>11}" for b in (1, 4, 16, 64, 256)))
    for L in lengths:
        side = math.isqrt(L)
        cells = []
        for nb in (1, 4, 16, 64, 256):
            blk = L // nb
            if math.isqrt(blk) ** 2 != blk and nb != 1:
                cells.append(f"{'-':>11}")
                continue
            t = time_sampling(model, spec, torch.zeros(1, dtype=torch.long), 4, side, side, blk if nb > 1 else None,
                              args.fig6_steps, "cache", 1.0)
            cells.append(f"{t:>10.2f}s")
        out(f"{L:>6} " + " ".join(cells))
    if not args.skip_mfu:
        name, mfu = part3(args, spec)
        out(f"(sampling MFU of the last row; target 25%: {mfu * 100:.1f}%)")
    out(f"RESULT cached speed-up / predicted FLOP ratio (worst of part 1): {min(rows):.2f} (target 0.8)")
    if args.readme:
        write_readme("sampling")


if __name__ == "__main__":
    main()
