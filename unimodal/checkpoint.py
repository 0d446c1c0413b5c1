"""Checkpoints: safetensors weights, tensor-only state, atomic directories.

A checkpoint is a directory `step_0001000/` holding
    model.safetensors   the weights (fp32 master copy)
    ema.safetensors     the EMA weights (when training keeps an EMA)
    state.pt            optimizer, LR schedule, RNG states, data position: tensors and plain
                        Python values only, read back with torch.load(weights_only=True)
    config.json         the run's configuration
It is written into a temporary sibling and renamed into place, then `latest` (a one-line
file) is replaced atomically: a crash at any moment leaves the previous checkpoint intact.
A file carrying a pickled object is refused on load, never executed.
"""
from __future__ import annotations

import json
import os
import re
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    keys = s["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, s["numpy_pos"], 0, 0.0))
    import ast
    st = ast.literal_eval(s["python"])
    random.setstate((st[0], tuple(st[1]), st[2]))


def _state_dict_cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save(run_dir: str | Path, step: int, model_sd: dict, state: dict, config: dict,
         ema_sd: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically under run_dir and point `latest` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:07d}"
    tmp = run_dir / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_dict_cpu(model_sd), str(tmp / "model.safetensors"))
    if ema_sd is not None:
        save_file(_state_dict_cpu(ema_sd), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    latest_tmp = run_dir / f".latest_{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, run_dir / "latest")
    _fsync_dir(run_dir)
    # keep the newest `keep` checkpoints up to this one (never this one, nor any of a later step)
    steps = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name <= final.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale_temporaries(run_dir)
    return final


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Removes the temporary directories of saves whose process no longer runs (a crash mid-save)."""
    for tmp in run_dir.glob(".tmp_step_*_*"):
        try:
            pid = int(tmp.name.rsplit("_", 1)[1])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


def latest(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    ptr = run_dir / "latest"
    if ptr.is_file():
        p = run_dir / ptr.read_text().strip()
        if (p / "model.safetensors").is_file():
            return p
    steps = sorted(p for p in run_dir.glob("step_*") if (p / "model.safetensors").is_file())
    return steps[-1] if steps else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    if p.is_dir():
        found = latest(p)
        if found is not None:
            return found
    raise CheckpointError(f"{path} is neither a checkpoint directory (with model.safetensors) "
                          f"nor a run directory holding one")


def load_weights(ckpt: str | Path, ema: bool = False) -> dict:
    ckpt = resolve(ckpt)
    f = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    if not f.is_file():
        raise CheckpointError(f"{f} does not exist" + (" (this run kept no EMA)" if ema else ""))
    return load_file(str(f))


def unpickler_reason(e: BaseException) -> str:
    """The reason in torch.load(weights_only=True)'s error, without its boilerplate: the class it refused
    ("GLOBAL builtins.exec ..."), the weights-only unpickler's own line, or the first other line."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # no terminal colours
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", msg, re.S)
    if m:
        return " ".join(m.group(1).split())
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and "weights_only" not in ln
             and "documentation" not in ln and "trust the source" not in ln]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_state(ckpt: str | Path) -> dict:
    ckpt = resolve(ckpt)
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled object that weights_only refuses, or a damaged file
        raise CheckpointError(f"{ckpt / 'state.pt'} cannot be read safely (tensors and plain values only): "
                              f"{unpickler_reason(e)}") from None


def load_config(ckpt: str | Path) -> dict:
    return json.loads((resolve(ckpt) / "config.json").read_text())
