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
from pathlib import Path

import time

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_lines: list[str] = []


def out(line: str = "") -> None:
    """print() that also keeps the line for the README section."""
    print(line, flush=True)
    _lines.append(line)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-reps FLOP/s of an n^3 matrix product in `dtype` on this machine, now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts)


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
    return (f"{cpu}, {os.cpu_count()} cores{mem}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}")


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
