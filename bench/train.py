"""Training throughput on this machine: tokens/s, counted model FLOPs, MFU against the matmul peak.

Model FLOPs per step are counted, not estimated from parameters: per layer and token 24 d^2 for
the dense layers (QKV, projection, MLP; 2 FLOPs per multiply-add), 12 d^2 per block for adaLN,
and 4 d per allowed (query, key) pair of the mask for attention (the empty part of SCAM is not
counted); the final layer and embeddings are added; a training step is 3x the forward. The
matmul peak (2048^3) is measured in the same run, at its start and right before and after each
row; this machine's throughput drifts, so MFU = achieved FLOP/s / the best peak measured anywhere
in the run (the peak beside each row is printed too).
Each config runs eager and with `model.compile=True` (the attention-free parts of every block
under torch.compile; the compilation is left out of the step times and printed apart); the
optimizer is train.py's (fused AdamW).

    python bench/train.py                 # tiny config and the ACDiT-B-shaped config, bf16
    python bench/train.py --precision fp32
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import matmul_peak, out, write_readme  # noqa: E402
from unimodal import masks  # noqa: E402
from unimodal.config import ModelConfig  # noqa: E402
from unimodal.diffusion import LossConfig, train_scheduler, training_loss  # noqa: E402
from unimodal.model import ACDiT  # noqa: E402
from unimodal.sequence import Image, PackSpec, Sample, pack  # noqa: E402


def step_flops(cfg: ModelConfig, packed) -> float:
    d, depth = cfg.hidden_size, cfg.depth
    tokens = int((packed.doc >= 0).sum())
    noisy = int(packed.noisy.sum())
    pairs = sum(int(masks.dense_mask(packed.layout.row(b)).sum()) for b in range(packed.doc.shape[0]))
    per_layer = 24 * d * d * tokens + 4 * d * pairs + 12 * d * d * packed.n_blocks
    head = 2 * d * cfg.patch_dim * (tokens + noisy) + 2 * 2 * d * d * packed.n_blocks  # embed, final layer
    return 3 * (depth * per_layer + head)


def run(name: str, cfg: ModelConfig, samples, steps: int, precision: str) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak_before = matmul_peak(dtype)
    torch._dynamo.reset()  # each row compiles for its own shapes, as a training run does
    torch.manual_seed(0)
    model = ACDiT(cfg)
    spec = PackSpec(patch_size=cfg.patch_size, latent_channels=cfg.latent_channels)
    packed = pack(samples, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sched, lc = train_scheduler(), LossConfig()
    flops = step_flops(cfg, packed)
    times, first = [], 0.0
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = training_loss(model, packed, sched, lc, torch.Generator().manual_seed(i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        elif i == 0:
            first = time.perf_counter() - t0
    t = statistics.median(times)
    peak = max(peak_before, matmul_peak(dtype))  # beside this row
    tokens = int((packed.doc >= 0).sum())
    name = f"{name}, {'compiled' if cfg.compile else 'eager'}"
    return {"name": name, "first_s": first, "params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
            "step_s": t, "tok_s": tokens / t, "gflop": flops / 1e9, "tflops": flops / t / 1e12, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--readme", action="store_true", help="write this run's output into README.md's results")
    args = ap.parse_args()
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak 2048^3: "
          f"bf16 {peak_bf16 / 1e12:.3f} TFLOP/s, fp32 {peak_fp32 / 1e12:.3f} TFLOP/s; training in {args.precision}")
    rows = []
    tiny = ModelConfig(depth=6, hidden_size=256, num_heads=4, mlp_act="gelu", latent_channels=1, patch_size=4,
                       num_classes=10, rope_max_pos=(32, 32, 32))
    for compiled in (False, True):
        rows.append(run("tiny", dataclasses.replace(tiny, compile=compiled),
                        [Sample([Image(torch.randn(1, 32, 32), block=16)], label=i % 10) for i in range(64)],
                        args.steps, args.precision))
        print(f"  {rows[-1]['name']}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    if not args.skip_b:
        bcfg = ModelConfig.preset("ACDiT-B", latent_channels=4, patch_size=1, num_classes=1000,
                                  rope_max_pos=(64, 64, 64))
        for compiled in (False, True):
            rows.append(run("ACDiT-B-shaped", dataclasses.replace(bcfg, compile=compiled),
                            [Sample([Image(torch.randn(4, 32, 32), block=256)], label=i) for i in range(2)],
                            args.steps, args.precision))
            print(f"  {rows[-1]['name']}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    peak = max([peak_bf16 if args.precision == "bf16" else peak_fp32] + [r["peak"] for r in rows])
    out(f"MFU against the best {args.precision} matmul peak measured in this run: {peak / 1e12:.3f} TFLOP/s "
        f"(the peak beside each row in brackets)")
    for r in rows:
        r["mfu"] = r["tflops"] * 1e12 / peak
        print_row(r)
    peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out(f"peak resident memory {peak_mem:,.0f} MiB")
    best = max(rows[-2:], key=lambda r: r["mfu"])  # the B-shaped rows (or tiny with --skip-b), the faster mode
    out(f"RESULT training MFU, {best['name']} ({args.precision}): {best['mfu'] * 100:.1f}% (target 40%)")
    if args.readme:
        write_readme("train")


def print_row(r: dict) -> None:
    out(f"{r['name']:<26} {r['params'] / 1e6:6.1f}M params  first step {r['first_s']:5.1f} s  {r['tokens']:>6} tokens/step  {r['step_s']:7.3f} s/step  "
          f"{r['tok_s']:>9,.0f} tok/s  {r['gflop']:>8.1f} GFLOP/step  {r['tflops']:.3f} TFLOP/s  "
        f"MFU {r['mfu'] * 100:5.1f}% (peak beside it {r['peak'] / 1e12:.3f})")


if __name__ == "__main__":
    main()
