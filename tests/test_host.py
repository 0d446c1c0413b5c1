"""unimodal.host: with freed memory kept, the large blocks of a training-like step reuse the previous
step's pages (page faults counted by the kernel, in a fresh process each); without, every step faults
its pages in again."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import resource, sys, torch
from unimodal.host import keep_freed_memory
assert keep_freed_memory() == (sys.argv[1] == "1")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
sizes = [64, 25, 100, 50, 8, 3]  # MiB: activations of a step, some above glibc's largest mmap threshold
for step in range(12):  # a step allocates them and their products, then frees them all
    if step == 2:
        before = faults()
    xs = [torch.ones(s * 2 ** 20 // 4) for s in sizes]
    ys = [x * 2 for x in xs]
    del xs, ys
print(faults() - before)
"""


def faults(keep: bool) -> int:
    env = {"UNIMODAL_KEEP_FREED_MEMORY": "1" if keep else "0", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", CODE, "1" if keep else "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_kept_memory_is_reused_without_page_faults():
    without, kept = faults(False), faults(True)
    assert without >= 10 * 500 / 2, without  # 10 steps of 500 MiB of fresh pages: at least one fault per 2 MiB
    # kept: the heap still grows now and then (a block that fits no free chunk: about 50-100 MiB of fresh
    # pages in some of the early steps, measured), then the steps run on the pages they freed
    assert kept < without / 10, (kept, without)
