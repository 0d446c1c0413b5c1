"""Training throughput on this machine: tokens/s, counted model FLOPs, MFU against the matmul peak.

Model FLOPs per step are counted, not estimated from parameters: per layer and token 24 d^2 for
the dense layers (QKV, projection, MLP; 2 FLOPs per multiply-add), 12 d^2 per block for adaLN,
and 4 d per allowed (query, key) pair of the mask for attention (the empty part of SCAM is not
counted); the final layer and embeddings are added; a training step is 3x the forward.
A shared CPU's matmul throughput drifts (bf16 2048^3 between ~0.6 and ~2.5 TFLOP/s on a Zen 5, 0.3-0.43 on a Zen 4, second to
second), so the peak is measured in the same stretch of time as the work: every timed step is
preceded by a window of back-to-back 2048^3 products as long as the step (fp32 ones for bf16 work
on a CPU without native bf16, the fastest route there), and MFU = the row's
achieved FLOP/s / the products' mean FLOP/s over its windows. The MFU against the fastest single
product of the whole run is printed beside it.
One more step per row runs under the profiler and splits its time between the dense matmuls, the
attention kernels and the rest, with the FLOP rate of the first two.
Each config runs eager and with `model.compile=True` (the attention-free parts of every block
under torch.compile; the compilation is left out of the step times and printed apart). The step
is train.py's: bf16 autocast over fp32 weights, the task's packing (the dead last clean block
dropped), gradient clipping, fused AdamW and the EMA. The tiny config is the demo's
(configs/mnist_class_tiny.py: 64 digits of 28x28 at patch 7 in 4 blocks of 4 tokens). Each row runs
in a process of its own, whose peak resident memory is printed with it.

    python bench/train.py                 # tiny config and the ACDiT-B-shaped config, bf16 (where native)
    python bench/train.py --precision fp32
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import NAMES, Peak, interleaved, yardstick, out, time_split, write_readme  # noqa: E402
from unimodal import masks  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from unimodal.config import PRECISIONS, ModelConfig, load_config, resolve_precision  # noqa: E402
from unimodal.diffusion import LossConfig, train_scheduler, training_loss  # noqa: E402
from unimodal.host import keep_freed_memory  # noqa: E402
from unimodal.model import ACDiT  # noqa: E402
from unimodal.sequence import Image, PackSpec, Sample, pack  # noqa: E402


def _rate(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e12:.3f} TFLOP/s" if seconds > 1e-6 else "(not seen by the profiler)"


def step_flops(cfg: ModelConfig, packed) -> tuple[float, float]:
    """(all, attention) FLOPs of one training step."""
    d, depth = cfg.hidden_size, cfg.depth
    tokens = int((packed.doc >= 0).sum())
    noisy = int(packed.noisy.sum())
    pairs = sum(int(masks.dense_mask(packed.layout.row(b)).sum()) for b in range(packed.doc.shape[0]))
    per_layer = 24 * d * d * tokens + 4 * d * pairs + 12 * d * d * packed.n_blocks
    head = 2 * d * cfg.patch_dim * (tokens + noisy) + 2 * 2 * d * d * packed.n_blocks  # embed, final layer
    return 3 * (depth * per_layer + head), 3 * depth * 4 * d * pairs


def run(name: str, cfg: ModelConfig, samples, steps: int, precision: str) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch._dynamo.reset()  # each row compiles for its own shapes, as a training run does
    torch.manual_seed(0)
    model = ACDiT(cfg)
    spec = PackSpec(patch_size=cfg.patch_size, latent_channels=cfg.latent_channels, drop_dead_clean=True)
    packed = pack(samples, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4, foreach=True)
    sched, lc = train_scheduler(), LossConfig()
    flops, attn_flops = step_flops(cfg, packed)
    seed = iter(range(10 ** 6))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = training_loss(model, packed, sched, lc, torch.Generator().manual_seed(next(seed)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    t0 = time.perf_counter()
    step()  # compiles when cfg.compile
    first = time.perf_counter() - t0
    peak = Peak(dtype)
    times = interleaved(step, steps, peak)
    split = time_split(step)
    tokens = int((packed.doc >= 0).sum())
    name = f"{name}, {'compiled' if cfg.compile else 'eager'}"
    tflops = flops * len(times) / sum(times) / 1e12
    return {"name": name, "first_s": first, "params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
            "step_s": statistics.median(times), "tok_s": tokens / statistics.median(times), "gflop": flops / 1e9,
            "tflops": tflops, "peak": {"mean": peak.mean, "best": peak.best}, "split": split, "flops": flops,
            "attn_flops": attn_flops, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def row(index: int, steps: int, precision: str) -> dict:
    """Row `index` of the table: (tiny, ACDiT-B-shaped) x (eager, compiled)."""
    compiled = bool(index % 2)
    if index < 2:
        tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist_class_tiny.py").model
        return run("tiny", dataclasses.replace(tiny, compile=compiled),
                   [Sample([Image(torch.randn(1, 28, 28), block=4)], label=i % 10) for i in range(64)],
                   steps, precision)
    bcfg = ModelConfig.preset("ACDiT-B", latent_channels=4, patch_size=1, num_classes=1000, rope_max_pos=(64, 64, 64))
    return run("ACDiT-B-shaped", dataclasses.replace(bcfg, compile=compiled),
               [Sample([Image(torch.randn(4, 32, 32), block=256)], label=i) for i in range(2)], steps, precision)


def row_in_child(index: int, steps: int, precision: str) -> dict:
    """`row` in a fresh process (its own heap, compile caches and peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--row", str(index), "--steps", str(steps), "--precision", precision,
               "--row-out", str(dest)]
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if res.returncode != 0 or not dest.exists():
            raise RuntimeError(f"bench row {index} failed (exit {res.returncode}): {' '.join(cmd)}")
        r = json.loads(dest.read_text())
    r["peak"] = SimpleNamespace(**r["peak"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="bf16 autocast, fp32, or auto: bf16 where this CPU computes it natively, else fp32")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (after warm-up)")
    ap.add_argument("--skip-b", action="store_true", help="time the tiny config only, not the ACDiT-B-shaped one")
    ap.add_argument("--readme", action="store_true", help="write this run's output into README.md's results")
    ap.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # a child process: this row only
    ap.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    heap = keep_freed_memory()  # as train.py does
    args.precision = resolve_precision(args.precision, "cpu")
    if args.row is not None:
        Path(args.row_out).write_text(json.dumps(row(args.row, args.steps, args.precision)))
        return
    work = torch.bfloat16 if args.precision == "bf16" else torch.float32
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training in {args.precision}; malloc "
        f"{'keeps freed memory (unimodal.host, as train.py)' if heap else 'as it is'}; each timed "
        f"step is preceded by a 2048^3 {NAMES[yardstick(work)]} matmul window as long as the step (the matmul throughput of "
        f"this machine drifts from second to second), so each row's achieved FLOP/s and matmul peak come from the same "
        f"stretch of time")
    rows = []
    for index in range(2 if args.skip_b else 4):
        rows.append(row_in_child(index, args.steps, args.precision))
        print(f"  {rows[-1]['name']}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    best = max(r["peak"].best for r in rows)
    out(f"MFU = achieved FLOP/s / the matmul's mean FLOP/s over the windows interleaved with that row's steps; "
        f"'vs best' divides by the fastest single matmul seen in the whole run, {best / 1e12:.3f} TFLOP/s")
    for r in rows:
        r["mfu"] = r["tflops"] * 1e12 / r["peak"].mean
        r["mfu_best"] = r["tflops"] * 1e12 / best
        print_row(r)
    out("time split of one more step, profiled (self time of the ops; 'rest' = elementwise and compiled regions, "
        "norms, optimizer, Python):")
    for r in rows:
        sp = r["split"]
        w = sp["wall"]
        out(f"  {r['name']:<26} dense matmuls {sp['matmul'] / w * 100:4.1f}% at "
            f"{(r['flops'] - r['attn_flops']) / max(sp['matmul'], 1e-9) / 1e12:.3f} TFLOP/s   attention kernels "
            f"{sp['attention'] / w * 100:4.1f}% at {_rate(r['attn_flops'], sp['attention'])}   "
            f"rest {sp['rest'] / w * 100:4.1f}%")
    top = max(rows[-2:], key=lambda r: r["mfu"])  # the B-shaped rows (or tiny with --skip-b), the faster mode
    out(f"RESULT training MFU, {top['name']} ({args.precision}, against the interleaved matmul peak): "
        f"{top['mfu'] * 100:.1f}% (target 40%)")
    if args.readme:
        write_readme("train")


def print_row(r: dict) -> None:
    out(f"{r['name']:<26} {r['params'] / 1e6:6.1f}M params  first step {r['first_s']:5.1f} s  {r['tokens']:>6} tokens/step  {r['step_s']:7.3f} s/step  "
          f"{r['tok_s']:>9,.0f} tok/s  {r['gflop']:>8.1f} GFLOP/step  {r['tflops']:.3f} TFLOP/s  "
        f"peak {r['peak'].mean / 1e12:.3f}  MFU {r['mfu'] * 100:5.1f}%  vs best {r['mfu_best'] * 100:5.1f}%  "
        f"peak RSS {r['rss_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
