"""Evaluation work split over the processes of a distributed launch (torchrun, accelerate launch).

`sample_set`: a set of N samples in batches, made by the processes together; each batch is written to
`<out_dir>/.samples/<tag>-n<N>-b<batch>/` as it is made, so that an evaluation killed and made again
with the same weights and settings (the tag is a hash of both) makes only the batches that are
missing, shared anew among its processes. Process 0 assembles the set in order once every process
has written its share (one shared filesystem, as DiT's sample_ddp.py assumes); `done` removes the
batches once the caller has written its metrics. One evaluation at a time may write a set: a second
one finds it locked and stops. Sample j draws from its own generator (`sampling.row_generators`),
so the set is the same for any number of processes and batch size.

`gather_rows`: rows computed in contiguous shares (`shard`), one per process, concatenated on every
process. Without a process group (one process) both run locally.
"""
from __future__ import annotations

import fcntl
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


def leave_group() -> None:
    """This process leaves its process group (when done: left to interpreter exit, gloo may abort a process
    whose peers are still working)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _all_agree(flag: bool) -> bool:
    """Whether every process's flag is true (an all-reduce; locally the flag)."""
    if rank_world()[1] == 1:
        return flag
    backend = dist.get_backend()
    t = torch.tensor([int(flag)], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def weights_tag(model: nn.Module, **settings) -> str:
    """A hash of the model's weights and buffers (bytes, names, shapes) and of the settings."""
    h = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=10)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _set_dir(out_dir: str | Path, tag: str, n: int, batch: int) -> Path:
    return Path(out_dir) / ".samples" / f"{tag}-n{n}-b{batch}"


def sample_set(make: Callable[[int, int], np.ndarray], n: int, batch: int, out_dir: str | Path, tag: str,
               desc: str = "sampling") -> np.ndarray | None:
    """make(first, count) -> samples first .. first + count - 1 (a numpy array, rows first). Returns the
    n samples in order on process 0, None on the others (after a barrier on all). Call `done` with the
    same arguments once the set's results are written."""
    if n < 1 or batch < 1:
        raise ValueError(f"sample_set needs n >= 1 and batch >= 1, got n={n}, batch={batch}")
    rank, world = rank_world()
    nb = math.ceil(n / batch)
    where = _set_dir(out_dir, tag, n, batch)
    where.mkdir(parents=True, exist_ok=True)
    lock = None
    if rank == 0:  # one evaluation at a time writes (and later removes) this set
        lock = open(where.parent / f"{where.name}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            lock = None
    if not _all_agree(rank != 0 or lock is not None):
        raise RuntimeError(f"{where}: another evaluation is writing this sample set; wait for it, or give this "
                           f"one another output directory")
    try:
        path = lambda i: where / f"batch_{i:06d}.npy"  # noqa: E731
        missing = [i for i in range(nb) if not path(i).is_file()]
        barrier()  # every process has listed what is missing before any writes more
        mine = missing[rank::world]
        bar = tqdm(total=nb, initial=nb - len(missing), desc=desc, leave=False, disable=rank != 0, unit="batch")
        if rank == 0 and len(missing) < nb:
            bar.write(f"{desc}: {nb - len(missing)} of {nb} batches already in {where}")
        for i in mine:
            first = i * batch
            x = np.asarray(make(first, min(batch, n - first)))
            tmp = where / f".batch_{i:06d}.{os.getpid()}.npy"
            np.save(tmp, x)
            os.replace(tmp, path(i))  # atomic: a killed process leaves no partial batch
            bar.update(min(world, bar.total - bar.n))  # (process 0's bar: all processes' pace)
        bar.close()
        barrier()
        if rank != 0:
            return None
        out = np.concatenate([np.load(path(i)) for i in range(nb)])
        if len(out) != n:
            raise RuntimeError(f"{where}: {len(out)} samples on disk, expected {n}")
        return out
    finally:
        if lock is not None:
            lock.close()


def done(out_dir: str | Path, tag: str, n: int, batch: int) -> None:
    """Removes a finished set's batches (process 0; after its results are written)."""
    if rank_world()[0] != 0:
        return
    where = _set_dir(out_dir, tag, n, batch)
    shutil.rmtree(where, ignore_errors=True)
    (where.parent / f"{where.name}.lock").unlink(missing_ok=True)
    try:
        where.parent.rmdir()  # .samples, once no other set is in it
    except OSError:
        pass


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
