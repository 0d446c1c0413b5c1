"""Shared by the benches: the machine line, and writing a bench's printed table into README.md.

Each bench keeps what it prints; with `--readme` it replaces its own section of README.md
(between `<!-- bench:NAME -->` markers, created under `<!-- bench-results -->` the first time)
with the date, the machine line, the command and the printed output.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from unimodal import block_kernel
from unimodal.config import native_bf16

README = Path(__file__).resolve().parents[1] / "README.md"
_lines: list[str] = []


def out(line: str = "") -> None:
    """print() that also keeps the line for the README section."""
    print(line, flush=True)
    _lines.append(line)


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def yardstick(dtype: torch.dtype) -> torch.dtype:
    """The product dtype whose throughput is the ideal for work in `dtype`: itself, except bf16 on a
    CPU without native bf16, where PyTorch's bf16 product is a reference loop 100x slower than fp32 and
    the fastest route for bf16 operands is fp32 arithmetic on them widened (what the block kernel does)."""
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16("cpu") else dtype


class Peak:
    """The n^3 matmul's throughput in `yardstick(dtype)`, measured in windows interleaved with the
    timed work (`name` says which dtype that is).

    A shared CPU's matmul throughput moves (bf16: ~0.6-2.5 TFLOP/s on a Zen 5, 0.3-0.43 on a Zen 4) from one second to
    the next. `mean` is the throughput over all windows (total FLOPs / total time): the rate the
    matmul reached under the same conditions as the work timed between the windows. `best` is the
    fastest single product seen (a burst the sustained work never sees for long).
    """

    def __init__(self, dtype: torch.dtype, n: int = 2048):
        self.n = n
        self.dtype = yardstick(dtype)
        self.name = NAMES.get(self.dtype, str(self.dtype))
        self.a, self.b = torch.randn(n, n, dtype=self.dtype), torch.randn(n, n, dtype=self.dtype)
        self.flop = 2 * n ** 3
        for _ in range(2):
            self.a @ self.b
        self.count, self.seconds, self.fastest = 0, 0.0, float("inf")

    def window(self, seconds: float) -> None:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self.a @ self.b
            t1 = time.perf_counter()
            self.count += 1
            self.seconds += t1 - t0
            self.fastest = min(self.fastest, t1 - t0)
            if t1 - start >= seconds:
                return

    @property
    def mean(self) -> float:
        return self.count * self.flop / self.seconds

    @property
    def best(self) -> float:
        return self.flop / self.fastest


def interleaved(fn, reps: int, peak: Peak, warmup: int = 1, min_window: float = 0.3) -> list[float]:
    """Times of `reps` calls of fn, each preceded by a matmul window as long as the previous call
    (at least min_window seconds); one more window closes the run. Returns the call times."""
    last = min_window
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        peak.window(max(min_window, last))
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        times.append(last)
    peak.window(max(min_window, last))
    return times


ATTN_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                block_kernel.FORWARD_EVENT, block_kernel.BACKWARD_EVENT)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def time_split(fn) -> dict:
    """One call of fn under the profiler: its wall seconds, and those spent in dense matmuls, in the
    attention kernels and in everything else (elementwise and compiled regions, norms, the
    optimizer, Python), from the ops' self times."""
    from torch.profiler import profile
    with profile() as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    own = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    mm = sum(own.get(k, 0.0) for k in MATMULS)
    attn = sum(own.get(k, 0.0) for k in ATTN_KERNELS)
    return {"wall": wall, "matmul": mm, "attention": attn, "rest": max(wall - mm - attn, 0.0)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    isa = torch.backends.cpu.get_cpu_capability()  # what ATen's kernels use: AVX2, AVX512, ...
    bf16 = "native bf16 matmul" if native_bf16("cpu") else "no native bf16 matmul"
    from unimodal import block_kernel
    return (f"{cpu} ({isa}, {bf16}, block kernel {block_kernel.target()}), {os.cpu_count()} cores{mem}; "
            f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def write_readme(name: str) -> None:
    date = datetime.date.today().isoformat()
    cmd = "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    body = "\n".join([f"<!-- bench:{name} -->", f"**{name}**, {date}, {machine()}", "", f"`{cmd}`", "",
                      "```", *_lines, "```", f"<!-- /bench:{name} -->"])
    text = README.read_text()
    pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: body, text)
    elif "<!-- bench-results -->" in text:
        text = text.replace("<!-- bench-results -->", "<!-- bench-results -->\n\n" + body, 1)
    else:
        text = text.rstrip() + "\n\n<!-- bench-results -->\n\n" + body + "\n"
    README.write_text(text)
    print(f"wrote the {name} section of {README}")
