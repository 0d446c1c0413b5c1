"""SCAM attention forward + backward on CPU: dense-mask SDPA vs the block-structured path.

For each total length L (clean + noised tokens of one image) and block count, prints the
measured time of each backend and its ratio to the ideal: the FLOPs of the allowed mask
entries only (forward 4 D, backward 8 D per entry) at the matmul throughput of the same stretch of
time (every timed call follows a window of 2048^3 products in the same dtype as long as the call,
fp32 for bf16 work on CPUs without native bf16; this machine's throughput drifts); the ratio
against the fastest single product of the section is printed too. Ends with one RESULT line: the worst block-path ratio at the largest block count
and L >= 2048 (or the longest L, if all are shorter) over the dtypes run.

    python bench/attention.py                   # fp32 and bf16, L in 512 2048 8192
    python bench/attention.py --lengths 512 2048 --dtypes fp32
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Peak, interleaved, out, write_readme  # noqa: E402
from unimodal import masks  # noqa: E402
from unimodal.attention import AttnContext, attend  # noqa: E402
from unimodal.sequence import Image, PackSpec, Sample, pack  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scam_layout(L: int, blocks: int):
    n = L // 2  # clean + noised copies
    side = math.isqrt(n)
    bs = n // blocks
    if side * side != n or math.isqrt(bs) ** 2 != bs:
        raise ValueError(f"L={L} with {blocks} blocks does not give square image blocks")
    return pack([Sample([Image(torch.zeros(1, side, side), block=bs)])], PackSpec()).layout


def run(L: int, blocks: int, dtype: torch.dtype, batch: int, heads: int, head_dim: int, reps: int):
    layout = scam_layout(L, blocks)
    layout = masks.Layout(layout.doc.expand(batch, -1), layout.step.expand(batch, -1), layout.noisy.expand(batch, -1))
    allowed = int(masks.dense_mask(layout.row(0)).sum())
    flops = 12 * head_dim * allowed * batch * heads
    q, k, v = (torch.randn(batch, heads, L, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, heads, L, head_dim, dtype=dtype)
    row = {"L": L, "blocks": blocks, "density": allowed / L ** 2, "flops": flops}
    for backend in ("sdpa", "block"):
        ctx = AttnContext(layout, None, None, backend)
        if backend == "sdpa":
            ctx.dense()
        else:
            ctx.groups()

        def step():  # gradients returned, not accumulated into leaves (in a model they flow on to the QKV layer)
            out = attend(q, k, v, ctx)
            torch.autograd.grad(out, (q, k, v), g)
        peak = Peak(dtype)
        row[backend] = statistics.median(interleaved(step, reps, peak))
        row[backend + "_peak"] = peak
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192],
                    help="total lengths L (clean + noised tokens of one square image)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16], help="block counts per image")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES), help="dtypes to time")
    ap.add_argument("--batch", type=int, default=2, help="sequences per call")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--head-dim", type=int, default=64, help="channels per head")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per backend and row (the median is kept)")
    ap.add_argument("--readme", action="store_true", help="write this run's output into README.md's results")
    args = ap.parse_args()
    torch.manual_seed(0)
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"heads {args.heads}, head_dim {args.head_dim}; times are forward + backward")
    worst = None
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        results = []
        for L in args.lengths:
            for nb in args.blocks:
                results.append(run(L, nb, dtype, args.batch, args.heads, args.head_dim, args.reps))
        best = max(r[b + "_peak"].best for r in results for b in ("sdpa", "block"))
        pk = results[0]["block_peak"]
        out(f"\n[{dname}] ideal = FLOPs / the mean {pk.name} {pk.n}^3 matmul throughput of the windows between that "
            f"backend's calls (in brackets, TFLOP/s); 'vs best' against the fastest single product of the section, "
            f"{best / 1e12:.3f} TFLOP/s")
        if pk.dtype != dtype:
            out(f"(this CPU has no native bf16 matmul: PyTorch's bf16 product is a reference loop there, and the "
                f"fastest route for bf16 operands is {pk.name} arithmetic on them widened, so that is the yardstick)")
        out(f"{'L':>6} {'blocks':>6} {'density':>8} {'sdpa ms':>9} {'x ideal':>16} {'block ms':>9} {'x ideal':>16} "
            f"{'vs best':>8} {'speed-up':>8}")
        for r in results:
            cells = []
            for b in ("sdpa", "block"):
                pk = r[b + "_peak"].mean
                cells.append(f"{r[b] * 1e3:>9.1f} {r[b] * pk / r['flops']:>8.2f} ({pk / 1e12:.3f})")
            out(f"{r['L']:>6} {r['blocks']:>6} {r['density']:>8.3f} {cells[0]} {cells[1]} "
                f"{r['block'] * best / r['flops']:>8.2f} {r['sdpa'] / r['block']:>8.2f}")
            if r["blocks"] == max(args.blocks) and r["L"] >= min(2048, max(args.lengths)):
                ratio = r["block"] * r["block_peak"].mean / r["flops"]
                if worst is None or ratio > worst[-1]:
                    worst = (dname, r["L"], r["blocks"], ratio)
    dname, L, nb, ratio = worst
    out(f"RESULT block-path time / FLOPs-ideal, worst at {nb} blocks and L >= {min(2048, max(args.lengths))} "
        f"over {', '.join(args.dtypes)} ({dname}, L={L}, against the interleaved matmul peak): {ratio:.2f} (target 1.5)")
    if args.readme:
        write_readme("attention")


if __name__ == "__main__":
    main()
