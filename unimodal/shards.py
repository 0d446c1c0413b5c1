"""Evaluation work split over the processes of a distributed launch (torchrun, accelerate launch).

`sample_set`: a set of N samples in batches; process r of W makes batches r, r + W, ... and writes
each to `<out_dir>/.samples/<tag>/` as it is made, so that a crashed or killed evaluation made
again with the same weights and settings makes only the batches that are missing (the tag is a
hash of both). Process 0 assembles the set in order once every process has written its share
(one shared filesystem, as DiT's sample_ddp.py assumes). Sample j draws from its own generator
(`sampling.row_generators`), so the set is the same for any number of processes and batch size.

`gather_rows`: rows computed in contiguous shards, one per process, concatenated on every process.
Without a process group (one process) both run locally.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def weights_tag(model: nn.Module, **settings) -> str:
    """A hash of the model's weights and buffers (bytes, names, shapes) and of the settings."""
    h = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=10)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sample_set(make: Callable[[int, int], np.ndarray], n: int, batch: int, out_dir: str | Path, tag: str,
               desc: str = "sampling") -> np.ndarray | None:
    """make(first, count) -> samples first .. first + count - 1 (a numpy array, rows first). Returns the
    n samples in order on process 0, None on the others (after a barrier on all)."""
    if n < 1 or batch < 1:
        raise ValueError(f"sample_set needs n >= 1 and batch >= 1, got n={n}, batch={batch}")
    rank, world = rank_world()
    nb = math.ceil(n / batch)
    where = Path(out_dir) / ".samples" / tag
    where.mkdir(parents=True, exist_ok=True)
    path = lambda i: where / f"batch_{i:06d}.npy"  # noqa: E731
    mine = range(rank, nb, world)
    todo = [i for i in mine if not path(i).is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, leave=False, disable=rank != 0,
               unit="batch")
    if rank == 0 and len(todo) < len(mine):
        bar.write(f"{desc}: {len(mine) - len(todo)} of {len(mine)} batches already in {where}")
    for i in todo:
        first = i * batch
        x = np.asarray(make(first, min(batch, n - first)))
        tmp = where / f".batch_{i:06d}.{os.getpid()}.npy"
        np.save(tmp, x)
        os.replace(tmp, path(i))  # atomic: a killed process leaves no partial batch
        bar.update(1)
    bar.close()
    barrier()
    if rank != 0:
        return None
    out = np.concatenate([np.load(path(i)) for i in range(nb)])
    if len(out) != n:
        raise RuntimeError(f"{where}: {len(out)} samples on disk, expected {n}")
    shutil.rmtree(where, ignore_errors=True)
    if not any(where.parent.iterdir()):
        where.parent.rmdir()
    return out


def shard(n: int) -> range:
    """This process's contiguous share of n rows."""
    rank, world = rank_world()
    return range(rank * n // world, (rank + 1) * n // world)


def gather_rows(x: Tensor, n: int) -> Tensor:
    """x: this process's rows `shard(n)` -> all n rows, on every process."""
    rank, world = rank_world()
    if world == 1:
        return x
    counts = [(r + 1) * n // world - r * n // world for r in range(world)]
    if x.shape[0] != counts[rank]:
        raise ValueError(f"gather_rows: process {rank} holds {x.shape[0]} rows, its shard of {n} is {counts[rank]}")
    pad = x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((max(counts), *x.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
