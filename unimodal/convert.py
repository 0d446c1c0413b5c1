"""Convert a reference ACDiT checkpoint (github.com/thunlp/ACDiT) into a unimodal checkpoint directory.

    python -m unimodal.convert SRC.pt OUT_DIR [--ema] [--dtype float32] [--set key=value ...]
    python -m unimodal.convert sample OUT_DIR SAMPLES_DIR --labels 207 360 [--vae VAE_DIR] [--device cuda]

SRC.pt is what the reference train.py saves with torch.save: {"model": state dict, "ema": state
dict, "opt": ..., "lrs": ..., "args": argparse.Namespace}. It is read with
torch.load(weights_only=True); the only class allowed besides tensors and plain containers is
argparse.Namespace, so a file that pickles anything else is refused before it can run code.

The model configuration is inferred from `args` exactly as the reference sample_img.py /
sample_vid.py build their models:
  - num_frames == 1: an image model, 2 RoPE axes (h, w), square blocks of block_size patches
    (raster blocks of whole rows for a non-ImageNet run without --square_block);
    num_frames > 1: a video model, 3 RoPE axes (t, h, w), blocks of block_size / (h w) whole frames.
  - latent grid h = w = image_size // vae_patch_pixels // patch_size; patch vectors (p, q, c);
    latent_channels = vae_latent_size.
  - RoPE split from nd_split ("2_3_3"; default 1_1 image, 2_3_3 video), RoPE lengths = the
    reference's max_lens ([h, w] or [num_frames, h, w]), rope_style "reference".
  - num_classes: 1000 for ImageNet, 101 for UCF101 (the sample scripts' constants), else args.num_classes.
  - depth, hidden size and MLP width from the weights (head_dim is 64: the reference RoPE assumes it),
    cross-checked against args.model when it names a paper size.

Every tensor is mapped to unimodal's names (t_embedder.mlp.0/2 -> t_embedder.linear_1/2,
y_embedder.embedding_table -> y_embedder, the rest keeps its name); a DDP "module." (or a
torch.compile "_orig_mod.") prefix is stripped. Any unknown key, missing key or shape mismatch
is refused with one message naming all of them, and nothing is written: the output directory
is assembled in a temporary directory beside it and renamed into place at the end.

OUT_DIR gets model.safetensors and config.json: {"format", "model": ModelConfig fields,
"pack": PackSpec fields, "sampling": {...}, "source": {...}}. `load_converted(OUT_DIR)` returns
(model, ConvertedInfo) for the samplers and evaluate.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import unpickler_reason
from .config import ModelConfig, model_config_from_dict, to_dict
from .sequence import Image, PackSpec, Sample, Video, image_block_shape, patchify_image, patchify_video, \
    unpatchify_image, unpatchify_video

FORMAT = "unimodal-acdit-converted"
FORMAT_VERSION = 1
HEAD_DIM = 64  # the reference RopeND is built with its default head_dim=64
FREQ_DIM = 256  # the reference TimestepEmbedder's frequency_embedding_size

# reference model names -> (depth, hidden, heads); models.py names and train.py's size names
REFERENCE_MODELS: dict[str, tuple[int, int, int]] = {
    "ACDiT-B": (12, 768, 12), "ACDiT_132M": (12, 768, 12),
    "ACDiT-L": (24, 1024, 16), "ACDiT_460M": (24, 1024, 16),
    "ACDiT-XL": (28, 1152, 18), "ACDiT_677M": (28, 1152, 18),
    "ACDiT-H": (32, 1280, 20), "ACDiT_954M": (32, 1280, 20),
}
DATASET_CLASSES = {"ImageNet": 1000, "UCF101": 101}  # sample_img.py / sample_vid.py constants
REQUIRED_ARGS = ("block_size", "ar_len", "num_frames", "image_size", "patch_size", "vae_latent_size")
ARG_DEFAULTS = {"vae_patch_pixels": 8, "nd_split": None, "square_block": False, "dataset": "ImageNet",
                "model": None, "num_classes": None, "vae_path": None}
CFG_DEFAULT = {"image": 1.5, "video": 2.5}
NUM_STEPS_DEFAULT = 25


class ConvertError(ValueError):
    """The checkpoint cannot be converted; the message says what was found and what was expected."""


# ----------------------------------------------------------------------------- safe reading

def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; argparse.Namespace is the only extra class allowed."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m:
            raise ConvertError(
                f"{path}: refused: the file pickles `{m.group(1)}`. Only tensors, plain containers (dict, list, "
                f"tuple, numbers, strings) and argparse.Namespace are accepted; nothing was executed or "
                f"unpickled beyond that point.") from None
        raise ConvertError(f"{path}: not a readable torch checkpoint (the weights-only unpickler stopped: "
                           f"{unpickler_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise ConvertError(f"{path}: not a readable torch checkpoint: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def _args_dict(obj: Any, path: Path) -> dict:
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, dict):
        return dict(obj)
    raise ConvertError(f"{path}: 'args' is a {type(obj).__name__}, expected an argparse.Namespace or a dict")


def select_weights(ckpt: Any, path: Path, weights: str = "model") -> tuple[dict[str, Tensor], dict]:
    """-> (state dict, args dict) from a loaded checkpoint."""
    if not isinstance(ckpt, dict):
        raise ConvertError(f"{path}: expected a dict with 'model' and 'args' entries, got a {type(ckpt).__name__}")
    if weights in ckpt:
        sd = ckpt[weights]
    elif weights == "model" and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        sd = ckpt  # a bare state dict
    else:
        have = sorted(k for k in ckpt if isinstance(k, str))
        hint = " (the file has no EMA weights)" if weights == "ema" else ""
        raise ConvertError(f"{path}: no '{weights}' entry{hint}; the file has entries {have}")
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: '{weights}' is a {type(sd).__name__}, expected a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConvertError(f"{path}: '{weights}' holds non-tensor entries {bad[:5]}")
    args = _args_dict(ckpt["args"], path) if "args" in ckpt and sd is not ckpt else {}
    return strip_prefix(sd), args


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a DDP 'module.' or torch.compile '_orig_mod.' prefix shared by all keys."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


# ----------------------------------------------------------------------------- what the args mean

@dataclass
class ReferenceLayout:
    """The reference model's geometry, derived from its training args."""
    kind: str  # "image" | "video"
    patch_size: int
    latent_channels: int
    grid: int  # patches per side (h = w)
    num_frames: int
    block_tokens: int  # the reference block_size (tokens per block)
    ar_len: int
    block: tuple[int, int] | None  # image: (kh, kw) patches per block
    frames_per_block: int | None  # video
    rope_split: tuple[int, ...]
    rope_max_pos: tuple[int, ...]
    num_classes: int
    downsample: int  # vae_patch_pixels

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.grid * self.patch_size
        if self.kind == "image":
            return (self.latent_channels, side, side)
        return (self.num_frames, self.latent_channels, side, side)

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2


def parse_args_fields(args: dict, overrides: dict | None = None) -> tuple[ReferenceLayout, dict]:
    """The reference's geometry from its args (with overrides applied). Returns (layout, args used)."""
    a = dict(ARG_DEFAULTS)
    a.update({k: v for k, v in args.items()})
    a.update(overrides or {})
    missing = [k for k in REQUIRED_ARGS if a.get(k) is None]
    if missing:
        raise ConvertError(f"the checkpoint's args lack {missing}; give them with --set KEY=VALUE "
                           f"(reference train.py fields)")
    for k in REQUIRED_ARGS + ("vae_patch_pixels",):
        if not isinstance(a[k], int) or isinstance(a[k], bool) or a[k] <= 0:
            raise ConvertError(f"args.{k} = {a[k]!r}: expected a positive integer")
    p, B, T, F = a["patch_size"], a["block_size"], a["ar_len"], a["num_frames"]
    if a["image_size"] % (a["vae_patch_pixels"] * p):
        raise ConvertError(f"args.image_size {a['image_size']} is not divisible by vae_patch_pixels "
                           f"{a['vae_patch_pixels']} x patch_size {p}")
    g = a["image_size"] // a["vae_patch_pixels"] // p
    spatial = g * g
    if spatial * F != B * T:
        raise ConvertError(f"args are inconsistent: spatial_len {spatial} x num_frames {F} != block_size {B} x "
                           f"ar_len {T} (the reference asserts this)")
    nd_split = a["nd_split"]
    if nd_split is None:
        split = (1, 1) if F == 1 else (2, 3, 3)
    else:
        try:
            split = tuple(int(x) for x in str(nd_split).split("_"))
        except ValueError:
            raise ConvertError(f"args.nd_split {nd_split!r}: expected integers joined by '_', e.g. '2_3_3'") from None
    axes = 2 if F == 1 else 3
    if len(split) != axes:
        raise ConvertError(f"args.nd_split {nd_split!r} has {len(split)} parts, the reference uses {axes} RoPE "
                           f"axes for num_frames={F}")
    unit = HEAD_DIM // 2 // sum(split)
    if sum(2 * s * unit for s in split) != HEAD_DIM:
        raise ConvertError(f"args.nd_split {nd_split!r} does not divide head_dim {HEAD_DIM} (the reference RoPE "
                           f"asserts sum(split dims) == 64)")
    max_pos = (g, g) if F == 1 else (F, g, g)
    dataset = a.get("dataset")
    num_classes = a["num_classes"] if dataset not in DATASET_CLASSES else DATASET_CLASSES[dataset]
    if num_classes is None:
        raise ConvertError("args.num_classes is missing; give it with --set num_classes=K")
    block = fpb = None
    if F == 1:
        kind = "image"
        square = bool(a.get("square_block")) or dataset == "ImageNet"
        if square:
            k = math.isqrt(B)
            if k * k != B or g % k:
                raise ConvertError(f"args.block_size {B} is not a square of patches tiling the {g}x{g} grid "
                                   f"(square_block is on)")
            block = (k, k)
        elif B % g == 0:
            block = (B // g, g)  # raster blocks of whole rows
        elif g % B == 0:
            block = (1, B)  # raster blocks inside one row
        else:
            raise ConvertError(f"args.block_size {B}: raster blocks that cut rows of the {g}x{g} grid unevenly "
                               f"cannot be expressed as image blocks")
    else:
        kind = "video"
        # sample_vid.py builds video models with square_block=False: blocks are raster runs of tokens
        if B % spatial:
            raise ConvertError(f"args.block_size {B} is not a whole number of frames of {spatial} tokens; "
                               f"only whole-frame video blocks are supported")
        fpb = B // spatial
    layout = ReferenceLayout(kind, p, a["vae_latent_size"], g, F, B, T, block, fpb, split, max_pos,
                             int(num_classes), a["vae_patch_pixels"])
    return layout, a


# ----------------------------------------------------------------------------- names and shapes

def reference_shapes(depth: int, hidden: int, mlp_hidden: int, patch_dim: int, num_classes: int) -> dict[str, tuple]:
    """Every tensor of a reference ACDiT state dict with its shape."""
    H = hidden
    s: dict[str, tuple] = {
        "x_embedder.weight": (H, patch_dim),
        "t_embedder.mlp.0.weight": (H, FREQ_DIM), "t_embedder.mlp.0.bias": (H,),
        "t_embedder.mlp.2.weight": (H, H), "t_embedder.mlp.2.bias": (H,),
        "y_embedder.embedding_table.weight": (num_classes + 1, H),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "norm1.weight": (H,),
            b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
            b + "attn.q_norm.weight": (HEAD_DIM,), b + "attn.k_norm.weight": (HEAD_DIM,),
            b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
            b + "norm2.weight": (H,),
            b + "mlp.fc1.weight": (mlp_hidden, H), b + "mlp.fc1.bias": (mlp_hidden,),
            b + "mlp.fc2.weight": (H, mlp_hidden), b + "mlp.fc2.bias": (H,),
            b + "adaLN_modulation.1.weight": (6 * H, H), b + "adaLN_modulation.1.bias": (6 * H,),
        })
    s.update({
        "final_layer.norm_final.weight": (H,),
        "final_layer.linear.weight": (patch_dim, H), "final_layer.linear.bias": (patch_dim,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
    })
    return s


_RENAMES = (
    ("t_embedder.mlp.0.", "t_embedder.linear_1."),
    ("t_embedder.mlp.2.", "t_embedder.linear_2."),
    ("y_embedder.embedding_table.", "y_embedder."),
)


def unimodal_name(ref_name: str) -> str:
    for old, new in _RENAMES:
        if ref_name.startswith(old):
            return new + ref_name[len(old):]
    return ref_name


def _architecture(sd: dict[str, Tensor], a: dict) -> tuple[int, int, int, int]:
    """(depth, hidden, heads, mlp_hidden) from the weights, checked against args.model."""
    if "x_embedder.weight" not in sd or sd["x_embedder.weight"].dim() != 2:
        raise ConvertError("missing key x_embedder.weight (a 2-d (hidden, patch_dim) tensor): "
                           "this is not a reference ACDiT state dict")
    hidden = int(sd["x_embedder.weight"].shape[0])
    ids = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    depth = max(ids) + 1 if ids else 0
    if depth == 0:
        raise ConvertError("no blocks.N.* keys: this is not a reference ACDiT state dict")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_hidden = int(fc1.shape[0]) if fc1 is not None and fc1.dim() == 2 else 4 * hidden
    if hidden % HEAD_DIM:
        raise ConvertError(f"hidden size {hidden} (x_embedder.weight rows) is not a multiple of the reference "
                           f"head_dim {HEAD_DIM}")
    heads = hidden // HEAD_DIM
    name = a.get("model")
    if name in REFERENCE_MODELS:
        want = REFERENCE_MODELS[name]
        if (depth, hidden, heads) != want:
            raise ConvertError(f"args.model {name!r} means depth {want[0]}, hidden {want[1]}, {want[2]} heads, "
                               f"but the weights have depth {depth}, hidden {hidden} ({heads} heads of 64)")
    return depth, hidden, heads, mlp_hidden


def check_and_map(sd: dict[str, Tensor], expected: dict[str, tuple], what: str = "checkpoint") -> dict[str, Tensor]:
    """Refuse unknown keys, missing keys and shape mismatches (all listed); return unimodal names."""
    problems = []
    for k in sorted(set(expected) - set(sd)):
        problems.append(f"missing key {k} (expected shape {list(expected[k])})")
    for k in sorted(set(sd) - set(expected)):
        problems.append(f"unknown key {k} (shape {list(sd[k].shape)})")
    for k in sorted(set(sd) & set(expected)):
        if tuple(sd[k].shape) != tuple(expected[k]):
            problems.append(f"shape mismatch at {k}: got {list(sd[k].shape)}, expected {list(expected[k])}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(f"{what} does not match a reference ACDiT with these args:\n  "
                           + "\n  ".join(problems[:20]) + more)
    return {unimodal_name(k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- conversion

@dataclass
class Converted:
    state_dict: dict[str, Tensor]
    config: dict


def convert_checkpoint(ckpt: Any, path: str | os.PathLike = "<checkpoint>", weights: str = "model",
                       overrides: dict | None = None, dtype: str = "float32") -> Converted:
    """A loaded reference checkpoint -> unimodal state dict and config.json contents (nothing written)."""
    path = Path(path)
    sd, args = select_weights(ckpt, path, weights)
    layout, a = parse_args_fields(args, overrides)
    depth, hidden, heads, mlp_hidden = _architecture(sd, a)
    expected = reference_shapes(depth, hidden, mlp_hidden, layout.patch_dim, layout.num_classes)
    mapped = check_and_map(sd, expected, f"{path} [{weights}]")
    cfg = ModelConfig(depth=depth, hidden_size=hidden, num_heads=heads, mlp_ratio=mlp_hidden / hidden,
                      latent_channels=layout.latent_channels, patch_size=layout.patch_size,
                      num_classes=layout.num_classes, vocab_size=0, qk_norm=True, norm_eps=1e-6,
                      rope_axes=len(layout.rope_split), rope_split=layout.rope_split,
                      rope_max_pos=layout.rope_max_pos, rope_style="reference")
    _check_engine_names(cfg, mapped)
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "keep": None}
    if dtype not in cast:
        raise ConvertError(f"dtype {dtype!r}: choose one of {sorted(cast)}")
    out = {k: (v if cast[dtype] is None or not v.is_floating_point() else v.to(cast[dtype])).contiguous().clone()
           for k, v in mapped.items()}
    pack = PackSpec(patch_size=layout.patch_size, latent_channels=layout.latent_channels, positions="reference")
    sampling = {
        "kind": layout.kind,
        "latent_shape": list(layout.latent_shape),
        "block": list(layout.block) if layout.block else None,  # image: patches per block (kh, kw)
        "frames_per_block": layout.frames_per_block,  # video
        "block_tokens": layout.block_tokens,
        "ar_len": layout.ar_len,
        "num_classes": layout.num_classes,
        "null_class": layout.num_classes,
        "cfg_scale": CFG_DEFAULT[layout.kind],
        "num_steps": NUM_STEPS_DEFAULT,
        "scheduler": "dpm",
        "vae_downsample": layout.downsample,
        "vae_path": a.get("vae_path"),
        "image_size": a["image_size"],
    }
    source = {
        "file": path.name,
        "weights": weights,
        "args": {k: v for k, v in sorted(a.items()) if isinstance(v, (str, int, float, bool, type(None)))},
        "dtype": dtype,
        "reference": "github.com/thunlp/ACDiT models.py",
    }
    config = {"format": FORMAT, "version": FORMAT_VERSION, "model": to_dict(cfg),
              "pack": dataclasses.asdict(pack), "sampling": sampling, "source": source}
    return Converted(out, config)


def _check_engine_names(cfg: ModelConfig, mapped: dict[str, Tensor]) -> None:
    """The mapped names and shapes must be exactly those of unimodal's ACDiT for this config."""
    from .model import ACDiT
    with torch.device("meta"):
        ref = ACDiT(cfg).state_dict()
    want = {k: tuple(v.shape) for k, v in ref.items()}
    got = {k: tuple(v.shape) for k, v in mapped.items()}
    if want != got:
        diff = [f"{k}: unimodal {want.get(k)}, mapped {got.get(k)}" for k in sorted(set(want) | set(got))
                if want.get(k) != got.get(k)]
        raise ConvertError("the mapped weights do not fit unimodal's ACDiT:\n  " + "\n  ".join(diff[:20]))


def write_converted(conv: Converted, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write model.safetensors + config.json into a temporary directory beside out_dir, then rename."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ConvertError(f"{out} exists and is not an empty directory (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(conv.state_dict, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(conv.config, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, weights: str = "model",
            overrides: dict | None = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Read, check and convert SRC, then write OUT_DIR. Raises ConvertError (writing nothing) on refusal."""
    ckpt = read_checkpoint(src)
    conv = convert_checkpoint(ckpt, src, weights, overrides, dtype)
    return write_converted(conv, out_dir, overwrite)


# ----------------------------------------------------------------------------- loading

@dataclass
class ConvertedInfo:
    """What a sampler / evaluate.py needs besides the model."""
    kind: str  # "image" | "video"
    model_config: ModelConfig
    pack: PackSpec
    latent_shape: tuple  # (C, H, W) or (T, C, H, W)
    block: tuple[int, int] | None  # image: patches per block
    frames_per_block: int | None  # video
    block_tokens: int
    ar_len: int
    num_classes: int
    cfg_scale: float
    num_steps: int
    scheduler: str
    config: dict = field(repr=False, default_factory=dict)  # the whole config.json

    def segment(self, latent: Tensor) -> Image | Video:
        """A latent of this model's shape as a sequence segment with the reference's blocking."""
        if tuple(latent.shape) != tuple(self.latent_shape):
            raise ValueError(f"latent shape {tuple(latent.shape)} != the model's {tuple(self.latent_shape)}")
        if self.kind == "image":
            return Image(latent, block=tuple(self.block))
        return Video(latent, frames_per_block=self.frames_per_block)

    def sample(self, latent: Tensor, label: int | None = None) -> Sample:
        return Sample([self.segment(latent)], label=label)

    def to_reference_tokens(self, latent: Tensor) -> Tensor:
        """(C, H, W) / (T, C, H, W) latent -> the reference's (T_blocks, B, C_patch) token layout."""
        p = self.pack.patch_size
        if self.kind == "image":
            kh, kw = self.block
            return patchify_image(latent, p, kh, kw)
        return patchify_video(latent, p, self.frames_per_block)

    def from_reference_tokens(self, tokens: Tensor) -> Tensor:
        """The reference's (T_blocks, B, C_patch) tokens -> the latent."""
        p = self.pack.patch_size
        flat = tokens.reshape(-1, tokens.shape[-1])
        if self.kind == "image":
            C, H, W = self.latent_shape
            Hp, Wp, kh, kw = image_block_shape(Image(torch.zeros(C, H, W), tuple(self.block)), p)
            return unpatchify_image(flat, p, Hp, Wp, kh, kw)
        T, C, H, W = self.latent_shape
        return unpatchify_video(flat, p, T, H // p, W // p)

    def generate(self, model, labels: Tensor, cfg_scale: float | None = None, steps: int | None = None,
                 generator: torch.Generator | None = None, mode: str = "cache") -> Tensor:
        """Class-conditional latents (N, *latent_shape) with the project's block sampler."""
        from .sampling import sample_images, sample_videos
        cfg = self.cfg_scale if cfg_scale is None else cfg_scale
        steps = self.num_steps if steps is None else steps
        if self.kind == "image":
            return sample_images(model, self.pack, labels, tuple(self.latent_shape), block=tuple(self.block),
                                 cfg_scale=cfg, steps=steps, scheduler=self.scheduler, generator=generator, mode=mode)
        return sample_videos(model, self.pack, labels, tuple(self.latent_shape), self.frames_per_block,
                             cfg_scale=cfg, steps=steps, scheduler=self.scheduler, generator=generator, mode=mode)


def read_info(ckpt_dir: str | os.PathLike) -> ConvertedInfo:
    d = Path(ckpt_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{d}: no config.json (convert a reference checkpoint with python -m unimodal.convert)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ConvertError(f"{cfg_path}: format {config.get('format')!r}, expected {FORMAT!r}")
    mcfg = model_config_from_dict(config["model"])
    pack_d = dict(config["pack"])
    pack = PackSpec(**pack_d)
    s = config["sampling"]
    return ConvertedInfo(s["kind"], mcfg, pack, tuple(s["latent_shape"]),
                         tuple(s["block"]) if s.get("block") else None, s.get("frames_per_block"),
                         s["block_tokens"], s["ar_len"], s["num_classes"], float(s["cfg_scale"]),
                         int(s["num_steps"]), s["scheduler"], config)


def load_converted(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, **cfg_overrides: Any):
    """-> (ACDiT in eval mode, ConvertedInfo). cfg_overrides change ModelConfig fields that do not
    touch the weights (e.g. attn_backend="sdpa")."""
    from safetensors.torch import load_file
    from .config import replace_strict
    from .model import ACDiT
    info = read_info(ckpt_dir)
    if cfg_overrides:
        info.model_config = replace_strict(info.model_config, **cfg_overrides)
    model = ACDiT(info.model_config)
    sd = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), info


# ----------------------------------------------------------------------------- CLI

def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConvertError(f"--set {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        try:
            import ast
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def sample_main(argv: list[str]) -> int:
    """python -m unimodal.convert sample CKPT_DIR OUT_DIR --labels 207 360 ... [--vae DIR]"""
    ap = argparse.ArgumentParser(prog="python -m unimodal.convert sample",
                                 description="Class-conditional samples from a converted checkpoint directory.")
    ap.add_argument("ckpt_dir", help="a directory written by python -m unimodal.convert")
    ap.add_argument("out_dir", help="where the PNGs / GIFs and latents.npy go")
    ap.add_argument("--labels", type=int, nargs="+", required=True, help="one class label per sample")
    ap.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory; without it only latents are saved")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: 1.5 image, 2.5 video)")
    ap.add_argument("--steps", type=int, default=None, help="DPM-Solver steps per block (default 25)")
    ap.add_argument("--seed", type=int, default=0, help="sample j draws from a generator of (seed, j)")
    ap.add_argument("--batch", type=int, default=8, help="samples per sampling batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs (default: cuda when available)")
    ns = ap.parse_args(argv)
    import numpy as np
    try:
        model, info = load_converted(ns.ckpt_dir, device=ns.device)
    except ConvertError as e:
        print(f"convert sample: error: {e}", file=sys.stderr)
        return 2
    bad = [y for y in ns.labels if not 0 <= y < info.num_classes]
    if bad:
        print(f"convert sample: error: labels {bad} outside 0..{info.num_classes - 1}", file=sys.stderr)
        return 2
    codec = None
    if ns.vae:
        from .codecs import VAECodec
        codec = VAECodec(ns.vae, device=ns.device)
    out = Path(ns.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .sampling import row_generators
    labels = torch.tensor(ns.labels)
    lat = torch.cat([info.generate(model, y, ns.cfg, ns.steps,
                                   generator=row_generators(ns.seed, len(y), i * ns.batch)).float().cpu()
                     for i, y in enumerate(labels.split(ns.batch))])  # (N, *latent_shape): whatever --batch
    np.save(out / "latents.npy", lat.numpy())
    if codec is not None:
        from PIL import Image as PILImage
        px = codec.decode(lat)  # (N, C, H, W) or (N, T, C, H, W) in [-1, 1]
        u8 = ((px + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        for i, y in enumerate(ns.labels):
            frames = [u8[i]] if info.kind == "image" else list(u8[i])
            for f, fr in enumerate(frames):
                name = f"{i:04d}_class{y}.png" if info.kind == "image" else f"{i:04d}_class{y}_frame{f:02d}.png"
                PILImage.fromarray(fr.permute(1, 2, 0).numpy()).save(out / name)
    print(f"wrote {len(ns.labels)} {info.kind} sample(s) to {out}" + ("" if codec else " (latents only: no --vae)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sample":
        return sample_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m unimodal.convert",
                                 description="Convert a thunlp/ACDiT checkpoint into a unimodal checkpoint directory. "
                                             "`python -m unimodal.convert sample --help`: samples from one.")
    ap.add_argument("src", help="reference checkpoint (.pt with 'model' / 'ema' and 'args')")
    ap.add_argument("out_dir", help="output directory (model.safetensors + config.json)")
    ap.add_argument("--ema", action="store_true", help="convert the 'ema' weights instead of 'model'")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "keep"])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override or supply a training arg (e.g. --set num_classes=1000)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    ns = ap.parse_args(argv)
    try:
        out = convert(ns.src, ns.out_dir, "ema" if ns.ema else "model", _parse_set(ns.sets), ns.dtype, ns.overwrite)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    info = read_info(out)
    c = info.model_config
    print(f"wrote {out}: {info.kind} model depth {c.depth}, hidden {c.hidden_size}, {c.num_heads} heads, "
          f"latent {list(info.latent_shape)}, {info.ar_len} blocks of {info.block_tokens} tokens, "
          f"{info.num_classes} classes, rope split {list(c.rope_split)} lengths {list(c.rope_max_pos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
