"""Train any task: config -> task -> model, accelerate, EMA -> one generic loop over task.loss().

    python train.py configs/mnist_class_tiny.py                      # one process
    python train.py configs/mnist_class_tiny.py steps=200 optim.lr=1e-3 out_dir=runs/try
    python train.py configs/mnist_class_tiny.py --resume             # continue from out_dir's latest checkpoint
    python train.py configs/mnist_class_tiny.py --overwrite          # start over where a run already saved
    torchrun --nproc_per_node 2 train.py configs/mnist_class_tiny.py # DDP over gloo on CPU (NCCL on GPUs)
    accelerate launch --num_processes 8 train.py configs/imagenet256_acdit_xl.py   # multi-GPU (DDP or FSDP)

Overrides are dotted `key=value` pairs checked against the config dataclasses: an unknown key
fails. The loop: bf16 autocast where the hardware computes bf16 natively (`precision="auto"`; on
GPUs and on CPUs with AVX512-BF16 or AMX) over fp32 master weights, AdamW, a warmup-stable-decay
schedule, gradient clipping, EMA; a progress bar with loss, tokens/s and ETA; TensorBoard logs
and sample grids; atomic checkpoints (safetensors weights, optimizer, schedule, EMA, RNG, data
position). A non-finite loss or gradient norm stops the run before the optimizer step, leaving
the last good checkpoint untouched. A new run refuses an out_dir holding another run's checkpoints
(--resume continues that run, --overwrite deletes it first).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.training_utils import EMAModel
from tqdm import tqdm
from transformers.optimization import get_wsd_schedule

from tasks import build_task
from unimodal import checkpoint as ckpt
from unimodal import shards
from unimodal.config import TrainConfig, load_config, native_bf16, replace_strict, resolve_precision
from unimodal.host import keep_freed_memory


class NonFiniteLoss(RuntimeError):
    pass


class OutDirInUse(FileExistsError):
    pass


RUN_FILES = ("latest", "config.json", "log.jsonl", "tb", "samples", "eval")  # what a run writes besides step_*


def claim_out_dir(out: Path, resume: bool, overwrite: bool, main: bool, accelerator) -> None:
    """A new run starts only in an out_dir without another run's checkpoints (their pruning, `latest`, the
    log and the TensorBoard events would mix with this run's); with `overwrite` the old run is deleted."""
    found = ckpt.latest(out)
    if resume or found is None:
        return
    if not overwrite:
        raise OutDirInUse(f"{out} holds the checkpoints of another run (latest: {found.name}): pass --resume "
                              f"to continue it, --overwrite to delete it and start over there, or choose another "
                              f"out_dir")
    if main:
        for p in [*out.glob("step_*"), *out.glob(".tmp_step_*"), *(out / n for n in RUN_FILES)]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    accelerator.wait_for_everyone()


def config_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["task_type"] = type(cfg.task).__name__
    return d


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig saved by config_dict (checkpoints' config.json)."""
    from tasks import config_class
    from unimodal.config import OptimConfig, model_config_from_dict, replace_strict
    d = dict(d)
    task_cls = config_class(d.pop("task_type"))
    task = replace_strict(task_cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("task").items()})
    model = model_config_from_dict(d.pop("model"))
    optim = replace_strict(OptimConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("optim").items()})
    return replace_strict(TrainConfig(task=task), model=model, optim=optim, **d)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups: weight decay only on matrices (no decay on biases, norm weights and embedding
    tables, as MAE and GPT training do); with layer-wise lr decay (MAE), per layer too: embeddings are
    layer 0, transformer block i is layer i + 1, everything after the blocks is the top layer."""
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    depth, decay = cfg.model.depth, cfg.optim.layer_decay
    groups: dict[tuple[int, bool], list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = 0
        if decay < 1.0:
            m = re.search(r"blocks\.(\d+)\.", n)
            if m:
                layer = int(m.group(1)) + 1
            elif not any(k in n for k in ("x_embedder", "t_embedder", "y_embedder", "tok_embedder")):
                layer = depth + 1
        groups.setdefault((layer, p.ndim >= 2 and n not in tables), []).append(p)
    scale = (lambda layer: decay ** (depth + 1 - layer)) if decay < 1.0 else (lambda layer: 1.0)
    return [{"params": ps, "lr": cfg.optim.lr * scale(layer),
             "weight_decay": cfg.optim.weight_decay if wd else 0.0} for (layer, wd), ps in sorted(groups.items())]


def token_count(batch) -> int:
    packed = batch[0] if isinstance(batch, tuple) else batch
    return int((packed.doc >= 0).sum()) if hasattr(packed, "doc") else 0


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict:
    # find_unused_parameters: a text-only batch leaves the noise head and adaLN unused, an image-only one the
    # LM head, classification both (DDP's reducer otherwise stops at the next step)
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    if cfg.precision == "bf16" and not native_bf16(device) and main:
        warnings.warn(f"precision=bf16 on {device}, whose matmuls have no native bf16 (PyTorch runs them in a "
                      f"reference loop, ~100x slower than fp32): precision=auto picks fp32 here")
    cfg = replace_strict(cfg, precision=resolve_precision(cfg.precision, device))  # what runs, as recorded
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.out_dir)
    claim_out_dir(out, resume, overwrite, main, accelerator)
    task = build_task(cfg, rank, world, device)
    model = task.build_model()
    if cfg.init_from:
        sd = ckpt.load_weights(cfg.init_from, ema=(Path(ckpt.resolve(cfg.init_from)) / "ema.safetensors").exists())
        missing, unexpected = getattr(model, "load_backbone", model.load_state_dict)(sd, strict=False)
        if missing or unexpected:  # a partial load would train from a partly random model
            raise ckpt.CheckpointError(
                f"init_from={cfg.init_from} does not fit the model: {len(missing)} of its parameters missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); the model config "
                f"must be the checkpoint's (its config.json)")
        if main and not quiet:
            print(f"initialised from {cfg.init_from}")
    model.to(device)
    # warmup: diffusers' 1 - (1 + step)^-3/4 ramp, capped at ema_decay; else DiT's constant decay from step 1
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=3 / 4,
                   min_decay=0.0 if cfg.ema_warmup else cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = _wsd(opt, cfg)
    requested = cfg.steps  # `steps` as given; the total may be refitted to time_limit_min
    start = 0
    if resume:
        last = ckpt.latest(out)
        if last is None:
            if main and not quiet:
                print(f"--resume: no checkpoint in {out}, starting from scratch")
        else:
            model.load_state_dict(ckpt.load_weights(last))
            state = ckpt.load_state(last)
            saved_groups = len(state["optimizer"]["param_groups"])
            if saved_groups != len(opt.param_groups):
                raise ckpt.CheckpointError(
                    f"{last}: its optimizer state has {saved_groups} parameter groups, this run builds "
                    f"{len(opt.param_groups)} (weight decay and layer-wise lr decay set the grouping); start a new run "
                    f"from its weights with init_from={last} instead of --resume")
            # a total refitted to a time budget stands while `steps` is the one that run was given
            saved_total, saved_req = state.get("total_steps"), state.get("requested_steps")
            if saved_total and saved_req == requested and saved_total != cfg.steps:
                cfg = dataclasses.replace(cfg, steps=int(saved_total))
                sched = _wsd(opt, cfg)  # (before the optimizer's state: building it sets the groups' lr)
                if main and not quiet:
                    print(f"resumed run's schedule: {cfg.steps} steps, as refitted to its time budget "
                          f"(steps={requested} as given; pass another steps= to change the total)")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None and (last / "ema.safetensors").exists():
                shadow = ckpt.load_weights(last, ema=True)
                names = [n for n, _ in model.named_parameters()]
                ema.shadow_params = [shadow[n].to(device) for n in names]
                ema.optimization_step = int(state["ema_step"])
            ckpt.set_rng_state(state["rng"])
            start = int(state["step"])
            if main and not quiet:
                print(f"resumed from {last} at step {start}" + (
                    f": the run is complete ({cfg.steps} steps); pass a larger steps= to train on" if start >= cfg.steps
                    else ""))
    train_model, opt = accelerator.prepare(model, opt)
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=2, default=str))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    log_f = open(out / "log.jsonl", "a") if main else None
    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=cfg.steps, initial=start, disable=not main or quiet, dynamic_ncols=True,
               desc=f"{type(task).__name__} {n_params / 1e6:.1f}M params x{world}")
    t_last, tok_acc, history = time.perf_counter(), 0, []

    def save(step: int) -> None:
        if main:
            unwrapped = accelerator.unwrap_model(train_model)
            base = getattr(unwrapped, "_orig_mod", unwrapped)
            names = [n for n, _ in base.named_parameters()]
            ema_sd = dict(zip(names, ema.shadow_params)) if ema is not None else None
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                     "total_steps": total, "requested_steps": requested,
                     "ema_step": ema.optimization_step if ema is not None else 0, "rng": ckpt.rng_state(),
                     "data_position": step * cfg.global_batch, "world_size": world}
            ckpt.save(out, step, base.state_dict(), state, config_dict(cfg), ema_sd, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    step = start
    total = cfg.steps
    t_start = time.perf_counter()
    try:
        while step < total:
            train_model.train()
            batch = task.batch(step)
            with autocast:
                loss, parts = task.loss(train_model, batch)
            finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
            finite = accelerator.reduce(finite, reduction="sum") if world > 1 else finite
            if float(finite) < world:
                raise NonFiniteLoss(f"non-finite loss {float(loss.detach()):.4g} at step {step} (parts "
                                    f"{ {k: float(v) for k, v in parts.items()} }); stopping without an optimizer "
                                    f"step. The last good checkpoint is {ckpt.latest(out)}. Lower optim.lr, "
                                    f"check the data, or resume from it with --resume.")
            accelerator.backward(loss)
            gnorm = accelerator.clip_grad_norm_(train_model.parameters(), cfg.optim.grad_clip) \
                if cfg.optim.grad_clip > 0 else torch.tensor(0.0)
            if not math.isfinite(float(gnorm)):  # the norm of the synchronised gradients: the same on every rank
                raise NonFiniteLoss(f"non-finite gradient norm at step {step} (loss {float(loss.detach()):.4g}); "
                                    f"stopping without an optimizer step. The last good checkpoint is "
                                    f"{ckpt.latest(out)}.")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(model.parameters())
            tok_acc += token_count(batch) * world
            rec = {"step": step + 1, "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()},
                   "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm)}
            history.append(rec)
            if main:
                log_f.write(json.dumps(rec) + "\n")
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    now = time.perf_counter()
                    tps = tok_acc / max(now - t_last, 1e-9)
                    t_last, tok_acc = now, 0
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", **{k: f"{float(v):.3f}" for k, v in parts.items()},
                                    tok_s=f"{tps:,.0f}")
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step + 1)
                    writer.add_scalar("train/tokens_per_s", tps, step + 1)
                    log_f.flush()
            bar.update(1)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0 and main:
                with ema_weights(model, ema):
                    for p in task.preview(model.eval(), out / "samples", step + 1):
                        _log_image(writer, p, step + 1)
            if cfg.time_limit_min > 0 and step + 1 == start + 4:
                t_warm = time.perf_counter()  # the first steps (allocation, mask caches) are not typical
            if cfg.time_limit_min > 0 and step + 1 == start + 16:
                now = time.perf_counter()
                per_step = (now - t_warm) / 12
                fit = _steps_in_budget(step + 1, cfg.time_limit_min * 60 - (now - t_start), per_step)
                if world > 1:  # every rank must stop at the same step: the slowest rank's count
                    fit = int(accelerator.gather(torch.tensor([fit], device=device)).min())
                if fit < total:
                    total = max(fit, step + 2)
                    cfg = dataclasses.replace(cfg, steps=total)
                    sched = _refit_schedule(opt, sched, cfg)
                    bar.total = total
                    if main and not quiet:
                        bar.write(f"{per_step:.2f} s/step: {total} steps fit the {cfg.time_limit_min:g} min budget")
            if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == total:
                save(step + 1)
            step += 1
    finally:
        bar.close()
        if log_f:
            log_f.close()
    result = {"history": history, "out_dir": str(out)}
    if cfg.eval_at_end and (main or task.sharded_eval):
        with ema_weights(model, ema):
            metrics = task.evaluate(model.eval(), out / "eval", quick=False)
    if cfg.eval_at_end and main:
        result["eval"] = metrics
        if writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"eval/{k}", v, total)
        if not quiet:
            print(json.dumps(metrics, indent=2))
    if writer:
        writer.close()
    return result  # no barrier after process 0's metrics: the others would time out waiting


def _steps_in_budget(done: int, seconds_left: float, per_step: float) -> int:
    """The step count reached when the time left runs out at per_step seconds a step."""
    return done + int(max(0.0, seconds_left) / per_step)


def _wsd(opt, cfg: TrainConfig, last_epoch: int = -1):
    """transformers' warmup-stable-decay schedule over cfg.steps."""
    return get_wsd_schedule(opt, num_warmup_steps=cfg.optim.warmup_steps,
                            num_decay_steps=int(cfg.optim.decay_frac * cfg.steps), num_training_steps=cfg.steps,
                            decay_type=cfg.optim.decay_type, min_lr_ratio=cfg.optim.min_lr_ratio,
                            last_epoch=last_epoch)


def _refit_schedule(opt, sched, cfg: TrainConfig):
    """The same WSD schedule stretched to a new total, continuing from the current step."""
    done = sched.last_epoch
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"]
    return _wsd(opt, cfg, last_epoch=done - 1)  # its first step lands on `done`


class ema_weights:
    """Context: the model holds the EMA weights inside, its training weights outside."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        self.model.train()


def _log_image(writer, path: Path, step: int) -> None:
    import numpy as np
    from PIL import Image
    if writer is not None and path.suffix == ".png":
        writer.add_image(f"samples/{path.stem.split('_step')[0]}", np.asarray(Image.open(path).convert("RGB")),
                         step, dataformats="HWC")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a Python config file defining `config` (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=100 model.depth=4")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a new run in an out_dir that holds another run's checkpoints, deleting that run")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or prints")
    args = ap.parse_intermixed_args(argv)
    keep_freed_memory()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (OutDirInUse, ckpt.CheckpointError, FileNotFoundError, KeyError, TypeError, ValueError) as e:
        if os.environ.get("UNIMODAL_DEBUG") == "1":
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}\n"
              f"(UNIMODAL_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        shards.leave_group()


if __name__ == "__main__":
    main()
