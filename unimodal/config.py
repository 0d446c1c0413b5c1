"""Dataclass configs, Python config files and strict dotted overrides.

A config file is a Python file that defines `config` (an instance of a dataclass):

    # configs/mnist_tiny.py
    from unimodal.config import TrainConfig, ModelConfig
    config = TrainConfig(model=ModelConfig.preset("ACDiT-T", ...), ...)

Overrides are `a.b.c=value` strings; the value is parsed as a Python literal when it is
one (numbers, tuples, True/None), else taken as a string. An unknown key fails, naming
the key and the valid keys at that level.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------------- model

# (depth, hidden_size, num_heads): paper Table 1 and tiny CPU sizes; head_dim 64 throughout.
PRESETS: dict[str, tuple[int, int, int]] = {
    "ACDiT-B": (12, 768, 12),
    "ACDiT-L": (24, 1024, 16),
    "ACDiT-XL": (28, 1152, 18),
    "ACDiT-H": (32, 1280, 20),
    "ACDiT-S": (12, 384, 6),
    "ACDiT-T": (6, 256, 4),
    "ACDiT-Mini": (4, 128, 2),
    "ACDiT-Micro": (2, 64, 2),
}


ATTN_BACKENDS = ("auto", "sdpa", "block", "flex", "flash")


@dataclass
class ModelConfig:
    depth: int = 6
    hidden_size: int = 256
    num_heads: int = 4
    mlp_ratio: float = 4.0
    mlp_act: str = "gelu_tanh"  # DiT / the reference; "gelu" (erf) is several times cheaper on CPU
    # continuous modalities: one latent space for images and video frames
    latent_channels: int = 4
    patch_size: int = 1
    # conditioning: class labels (0 = none); the null class has index num_classes
    num_classes: int = 0
    # text: vocabulary (0 = no text embedding / LM head)
    vocab_size: int = 0
    qk_norm: bool = True
    norm_eps: float = 1e-6
    # init std of the class embedding (DiT: 0.02). The conditioning vector is t_emb + y_emb and the
    # timestep embedding soon grows to norm ~10-30, so a small model trained for minutes needs the
    # labels to start at a comparable scale to be heard at all
    class_embed_std: float = 0.02
    # RoPE-ND: number of axes (3 = M-RoPE layout for mixed sequences, 2 = (h, w) image-only),
    # the head-dim split between axes, the largest position per axis (sets each axis' base),
    # and the frequency rule: "paper" (DESIGN.md section 3) or "reference" (thunlp/ACDiT rope.py)
    rope_axes: int = 3
    rope_split: tuple[int, ...] = (2, 3, 3)
    rope_max_pos: tuple[int, ...] = (4096, 4096, 4096)
    rope_style: str = "paper"
    # attention backend: one of ATTN_BACKENDS (unimodal/attention.py says what each is and what "auto" picks)
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    # training and sampling passes run the attention-free parts of each block (norms, modulation,
    # QKV, RoPE, MLP, residuals) under torch.compile: fused elementwise kernels; costs a compilation
    # per pass shape (a few for sampling)
    compile: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    @staticmethod
    def preset(name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        depth, hidden, heads = PRESETS[name]
        cfg = ModelConfig(depth=depth, hidden_size=hidden, num_heads=heads)
        return replace_strict(cfg, **overrides)

    def sized_as(self, name: str) -> "ModelConfig":
        """This configuration with the depth, width and heads of preset `name`."""
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        depth, hidden, heads = PRESETS[name]
        return dataclasses.replace(self, depth=depth, hidden_size=hidden, num_heads=heads)

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.rope_split) != self.rope_axes or len(self.rope_max_pos) != self.rope_axes:
            raise ValueError(f"rope_split {self.rope_split} and rope_max_pos {self.rope_max_pos} "
                             f"must have rope_axes={self.rope_axes} entries")
        if self.mlp_act not in ("gelu_tanh", "gelu"):
            raise ValueError(f"mlp_act must be 'gelu_tanh' or 'gelu', got {self.mlp_act!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.rope_style not in ("paper", "reference"):
            raise ValueError(f"rope_style must be 'paper' or 'reference', got {self.rope_style!r}")
        half = self.head_dim // 2
        if half % sum(self.rope_split):
            raise ValueError(f"head_dim/2 = {half} is not divisible by sum(rope_split) = {sum(self.rope_split)}")


def rope_base(max_pos: int) -> int:
    """DESIGN.md section 3: 100 * ceil(8 L / (100 pi)), L the largest index on the axis."""
    return 100 * max(1, math.ceil(8 * max_pos / (100 * math.pi)))


# ----------------------------------------------------------------------------- training

DECAY_TYPES = ("linear", "cosine", "1-sqrt")  # transformers' WSD decay shapes


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_frac: float = 0.15  # WSD: the last fraction of training decays the learning rate
    decay_type: str = "linear"  # transformers' WSD decay: linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    layer_decay: float = 1.0  # layer-wise lr decay (MAE fine-tuning); 1 = off

    def __post_init__(self) -> None:
        bad = []
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            bad.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.decay_type not in DECAY_TYPES:
            bad.append(f"decay_type must be one of {DECAY_TYPES}, got {self.decay_type!r}")
        for name in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip"):
            if getattr(self, name) < 0:
                bad.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.decay_frac <= 1:
            bad.append(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if not 0 < self.layer_decay <= 1:
            bad.append(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if bad:
            raise ValueError("OptimConfig: " + "; ".join(bad))


@dataclass
class TrainConfig:
    task: Any  # a task config dataclass from tasks/ (its class names the task)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    global_batch: int = 64
    seed: int = 0
    precision: str = "auto"  # bf16 autocast with fp32 master weights, fp32, or auto (`resolve_precision`)
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # diffusers' power-3/4 ramp up to ema_decay; False: ema_decay from step 1 (DiT)
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end
    sample_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    init_from: str = ""  # checkpoint directory whose weights initialise the model (fine-tuning, probes)
    eval_at_end: bool = True
    # > 0: fit `steps` to this wall-time budget, measured after the first steps (the LR schedule stretched to
    # the fitted total); a --resume keeps that total and fits what is left of it to a new budget
    time_limit_min: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "sample_every", "keep_checkpoints", "time_limit_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def int_at_least(minimum: int):
    """An argparse type: an int no smaller than `minimum`, else a usage error naming the bound."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


# ----------------------------------------------------------------------------- precision

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: "torch.device | str") -> bool:
    """Whether the device's matmuls run in bf16 natively: CUDA with bf16 support; a CPU where oneDNN
    has bf16 kernels (AVX512-BF16, AMX or AVX512 cores). Elsewhere PyTorch's CPU bf16 matmul is a
    reference loop about 100x slower than fp32."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def resolve_precision(precision: str, device: "torch.device | str") -> str:
    """"bf16" or "fp32" as asked; "auto": bf16 autocast where the device computes bf16 natively
    (`native_bf16`), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


# ----------------------------------------------------------------------------- strict replace / overrides

def replace_strict(obj: Any, **kw: Any) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    bad = [k for k in kw if k not in names]
    if bad:
        raise KeyError(f"unknown key(s) {bad} for {type(obj).__name__}; valid keys: {sorted(names)}")
    return dataclasses.replace(obj, **kw)


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `a.b=value` overrides to a (nested) dataclass; returns a new object. All overrides
    of one dataclass are applied together, so related fields may change in any order."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise KeyError(f"override {item!r}: {p!r} is a value, not a group")
        node[path[-1]] = (_parse_value(text.strip()), key.strip(), text.strip())
    return _apply_tree(cfg, tree, "")


def _apply_tree(obj: Any, tree: dict, prefix: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise KeyError(f"override {prefix.rstrip('.')!r}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for head, sub in tree.items():
        if head not in names:
            raise KeyError(f"override {prefix + head!r}: unknown key {head!r} in {type(obj).__name__}; "
                           f"valid keys: {sorted(names)}")
        old = getattr(obj, head)
        if isinstance(sub, dict):
            changes[head] = _apply_tree(old, sub, prefix + head + ".")
            continue
        value, full, raw = sub
        if isinstance(old, str):  # text fields take the text as written (out_dir=2024 is a name, not a number)
            value = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
        if isinstance(old, bool) and isinstance(raw, str) and raw.lower() in _BOOLS:
            value = _BOOLS[raw.lower()]
        if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, bool):
            raise TypeError(f"override {full!r}: expected {type(old).__name__}, got the boolean {value!r}")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and not isinstance(value, type(old)) \
                and not (isinstance(old, tuple) and isinstance(value, tuple)):
            raise TypeError(f"override {full!r}: expected {type(old).__name__}, got {value!r}")
        changes[head] = value
    return dataclasses.replace(obj, **changes)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Execute a Python config file and return its `config` object with overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"unimodal_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise AttributeError(f"config file {path} defines no `config` object")
    return apply_overrides(module.config, overrides or [])


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    for k in ("rope_split", "rope_max_pos"):
        if k in d:
            d[k] = tuple(d[k])
    return replace_strict(ModelConfig(), **d)


__all__ = ["ATTN_BACKENDS", "ModelConfig", "OptimConfig", "TrainConfig", "PRESETS", "rope_base", "replace_strict",
           "apply_overrides", "load_config",
           "to_dict", "model_config_from_dict", "field", "dataclass"]
