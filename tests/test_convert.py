"""Reference-checkpoint conversion (unimodal.convert): format, refusals, and parity with thunlp/ACDiT.

The tiny checkpoints are built here in the reference's exact format (train.py's torch.save dict with
'model', 'ema', 'opt', 'lrs' and an argparse 'args' carrying train.py's fields), with deterministic
weights drawn from a seed. The oracle outputs in tests/data/acdit_ref_{image,video}.npz come from
the reference implementation itself, run outside this repository. Recipe:

  1. python3 -m venv /tmp/refenv
     /tmp/refenv/bin/pip install torch==2.13.0 timm==1.0.11 diffusers==0.31.0 "huggingface_hub<0.26" einops numpy
  2. Save models.py (commit f0a0125b2ac93eae5d4148bde659334ee1518fe6) and rope.py (commit
     a37bc9b5cd04ab406760f11c9a0c66cab30ed5c1) of github.com/thunlp/ACDiT into /tmp/ref/.
  3. .venv/bin/python tests/test_convert.py fixtures /tmp/acdit_fix
     (writes {image,video}.pt checkpoints, {image,video}_inputs.pt and make_oracle.py = ORACLE_SCRIPT)
  4. cd /tmp/ref && /tmp/refenv/bin/python /tmp/acdit_fix/make_oracle.py /tmp/acdit_fix tests/data
     (builds the reference ACDiT as sample_img.py / sample_vid.py do, tiny width instead of a paper
     preset; loads the fixture with load_state_dict(strict=True); dense SCAM mask; label dropout of
     the training forward off; runs forward(clean, noised, t, y) and sample(...) with DPM-Solver from
     the DDIM config, CFG 1.5 image / 2.5 video, a seeded generator, fp32.)

The npz files also record the reference model's own state-dict keys and shapes and the inputs, so
that a drift of this file's fixture builder from what the oracle saw is caught here.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unimodal import convert as C
from unimodal.diffusion import model_input
from unimodal.sequence import pack

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
TINY = dict(depth=2, hidden=128, heads=2)  # head_dim 64, as the reference RoPE assumes
N = 2  # samples per batch

# train.py's argparse fields (+ batch_size_per_rank, which train.py's main() adds before saving)
TRAIN_DEFAULTS = dict(
    data_path="/data", results_dir="results", vae_path="sdxl-vae", vae_patch_pixels=8, model="ACDiT-Tiny",
    dataset="ImageNet", num_classes=101, num_scales=8, num_frames=16, lr=1e-4, weight_decay=5e-2, beta1=0.9,
    beta2=0.95, epochs=1400, global_batch_size=256, global_seed=0, cfg=4.0, num_workers=4, log_every=100,
    ckpt_every=1, eval_every=5, images_per_label=25, mixed_precision="bf16", max_grad_norm=1.0, image_size=256,
    patch_size=1, vae_latent_size=4, block_size=16, square_block=False, ar_len=16, use_rope=False,
    project_name="acdit_ucf", spatial_2d=False, nd_split=None, lr_scheduler="wsd", lr_warmup=0.0,
    batch_size_per_rank=32)

KINDS = {
    # ImageNet-style: 8x8 latent (image 64 / 8), patch 1, square blocks of 4x4 = 16 patches, 4 blocks
    "image": dict(dataset="ImageNet", num_classes=1000, num_frames=1, image_size=64, patch_size=1,
                  vae_latent_size=4, block_size=16, ar_len=4, square_block=False, nd_split=None),
    # UCF-style: 4 frames of 8x8 latents, patch 2 (4x4 patches per frame), blocks of 2 frames
    "video": dict(dataset="UCF101", num_classes=101, num_frames=4, image_size=64, patch_size=2,
                  vae_latent_size=4, block_size=32, ar_len=2, square_block=False, nd_split="2_3_3"),
}
SAMPLING = {"image": dict(labels=[3, 7], cfg=1.5, steps=4, seed=11),
            "video": dict(labels=[5, 42], cfg=2.5, steps=4, seed=12)}
SEEDS = {"image": 1000, "video": 2000}


# ----------------------------------------------------------------------------- reference-format fixtures

def ref_args(kind: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{**TRAIN_DEFAULTS, **KINDS[kind], **kw})


def _geometry(kind: str):
    a = KINDS[kind]
    g = a["image_size"] // 8 // a["patch_size"]
    P = a["vae_latent_size"] * a["patch_size"] ** 2
    return g, P, a["ar_len"], a["block_size"], a["num_classes"]


def ref_shapes(kind: str) -> dict[str, tuple]:
    """The reference ACDiT's state dict (models.py: TimestepEmbedder, LabelEmbedder with a CFG row,
    timm Attention with qk RMSNorm over head_dim, timm Mlp, adaLN, FinalLayer) for the tiny width."""
    _, P, _, _, K = _geometry(kind)
    H, D = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    s = {"x_embedder.weight": (H, P), "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,),
         "t_embedder.mlp.2.weight": (H, H), "t_embedder.mlp.2.bias": (H,),
         "y_embedder.embedding_table.weight": (K + 1, H),
         "final_layer.norm_final.weight": (H,), "final_layer.linear.weight": (P, H), "final_layer.linear.bias": (P,),
         "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,)}
    for i in range(TINY["depth"]):
        for name, shape in [("norm1.weight", (H,)), ("norm2.weight", (H,)), ("attn.qkv.weight", (3 * H, H)),
                            ("attn.qkv.bias", (3 * H,)), ("attn.q_norm.weight", (D,)), ("attn.k_norm.weight", (D,)),
                            ("attn.proj.weight", (H, H)), ("attn.proj.bias", (H,)),
                            ("mlp.fc1.weight", (4 * H, H)), ("mlp.fc1.bias", (4 * H,)),
                            ("mlp.fc2.weight", (H, 4 * H)), ("mlp.fc2.bias", (H,)),
                            ("adaLN_modulation.1.weight", (6 * H, H)), ("adaLN_modulation.1.bias", (6 * H,))]:
            s[f"blocks.{i}.{name}"] = shape
    return s


def ref_state_dict(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic non-trivial weights (adaLN and the output layer are not zero as at init)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(ref_shapes(kind).items()):
        x = torch.randn(shape, generator=g)
        if "norm" in k:
            x = 1 + 0.1 * x
        elif k.endswith("bias"):
            x = 0.05 * x
        elif "embedding_table" in k:
            x = 0.5 * x
        else:
            x = x / math.sqrt(shape[1]) * (0.5 if "adaLN" in k else 1.0)
        sd[k] = x
    return sd


def ref_checkpoint(kind: str, **args_kw) -> dict:
    """What reference train.py saves (its optimizer state shortened to a stand-in of plain tensors)."""
    model = ref_state_dict(kind, SEEDS[kind])
    return {"model": model, "ema": ref_state_dict(kind, SEEDS[kind] + 1),
            "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
            "lrs": {"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [{}]},
            "args": ref_args(kind, **args_kw)}


def ref_inputs(kind: str) -> dict:
    """Training-forward inputs in the reference layout (N, T, B, C): clean, noised, t (N, T), y (N,)
    with the second sample on the null class."""
    _, P, T, B, K = _geometry(kind)
    g = torch.Generator().manual_seed(SEEDS[kind] + 7)
    return {"clean": torch.randn(N, T, B, P, generator=g), "noised": torch.randn(N, T, B, P, generator=g),
            "t": torch.randint(0, 1000, (N, T), generator=g), "y": torch.tensor([3, K]),
            "labels": torch.tensor(SAMPLING[kind]["labels"]), "cfg": SAMPLING[kind]["cfg"],
            "steps": SAMPLING[kind]["steps"], "sample_seed": SAMPLING[kind]["seed"]}


ORACLE_SCRIPT = r'''
"""Run the reference ACDiT (models.py / rope.py in the working directory) on the fixtures."""
import argparse
import sys
import numpy as np
import torch
import torch.library

# the PyPI torchvision wheel is a CUDA build whose C ops cannot load beside the CPU torch;
# timm needs only torchvision's Python side
_orig = torch.library.register_fake
torch.library.register_fake = lambda op, *a, **k: (lambda f: f) if str(op).startswith("torchvision::") else _orig(op, *a, **k)
sys.path.insert(0, ".")
import models
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

models.USE_FLEX_ATTENTION = False  # the dense SCAM mask (build_attention_mask)
src, dst = sys.argv[1], sys.argv[2]
for kind in ("image", "video"):
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(f"{src}/{kind}.pt", map_location="cpu", weights_only=True)
    inp = torch.load(f"{src}/{kind}_inputs.pt", weights_only=True)
    a, sd = ck["args"], ck["model"]
    hidden = sd["x_embedder.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    # as sample_img.py (num_classes=1000, square_block=True) / sample_vid.py (101, False)
    m = models.ACDiT(depth=depth, hidden_size=hidden, num_heads=hidden // 64,
                     latent_size=a.vae_latent_size * a.patch_size ** 2, block_size=a.block_size,
                     num_classes=1000 if kind == "image" else 101, ar_len=a.ar_len, temporal_len=a.num_frames,
                     spatial_len=(a.image_size // a.vae_patch_pixels // a.patch_size) ** 2,
                     nd_split=a.nd_split, square_block=kind == "image")
    ref_sd = m.state_dict()
    m.load_state_dict(sd, strict=True)
    m.eval()
    m.y_embedder.dropout_prob = 0.0  # forward() drops labels at random even in eval mode
    with torch.no_grad():
        fwd = m(inp["clean"], inp["noised"], inp["t"], inp["y"])
    P = a.vae_latent_size * a.patch_size ** 2
    outs = {}
    for name, cfg in (("sample", inp["cfg"]), ("sample_nocfg", 1.0)):
        sched = DPMSolverMultistepScheduler.from_config(DDIMScheduler().config)
        gen = torch.Generator().manual_seed(inp["sample_seed"])
        outs[name] = m.sample(inp["labels"], sched, inp["steps"], cfg=cfg,
                              target_shape=(len(inp["labels"]), a.ar_len, a.block_size, P),
                              generator=gen, dtype=torch.float).numpy()
    np.savez_compressed(
        f"{dst}/acdit_ref_{kind}.npz", forward=fwd.numpy(), **outs,
        keys=np.array(list(ref_sd)), shapes=np.array([",".join(map(str, v.shape)) for v in ref_sd.values()]),
        weight_abs_sum=np.array(sum(float(v.double().abs().sum()) for v in sd.values())),
        clean=inp["clean"].numpy(), noised=inp["noised"].numpy(), t=inp["t"].numpy(), y=inp["y"].numpy(),
        labels=inp["labels"].numpy(), cfg=np.array(inp["cfg"]), steps=np.array(inp["steps"]),
        sample_seed=np.array(inp["sample_seed"]))
    print(kind, "forward", tuple(fwd.shape), "sample", outs["sample"].shape)
'''


def write_fixtures(out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        torch.save(ref_checkpoint(kind), out / f"{kind}.pt")
        torch.save(ref_inputs(kind), out / f"{kind}_inputs.pt")
    (out / "make_oracle.py").write_text(ORACLE_SCRIPT.lstrip())


# ----------------------------------------------------------------------------- helpers

def oracle(kind: str) -> dict:
    path = DATA / f"acdit_ref_{kind}.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing; regenerate it with the recipe in this file's docstring")
    return dict(np.load(path))


def converted(kind: str, tmp_path: Path, **kw):
    src = tmp_path / f"{kind}.pt"
    torch.save(ref_checkpoint(kind), src)
    out = C.convert(src, tmp_path / f"{kind}_conv", **kw)
    return C.load_converted(out)


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def converted_image_and_vae(tmp_path: Path) -> Path:
    """The image fixture converted into tmp_path/conv, and a tiny random SD-shaped VAE in tmp_path/vae."""
    from diffusers import AutoencoderKL
    src = tmp_path / "image.pt"
    torch.save(ref_checkpoint("image"), src)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    return C.convert(src, tmp_path / "conv")


# ----------------------------------------------------------------------------- format and config

@pytest.mark.parametrize("kind", ["image", "video"])
def test_fixture_matches_the_reference_state_dict(kind):
    """The fixture builder writes exactly the keys and shapes the reference model has (recorded
    by the oracle run from the reference's own state_dict()), with the weights the oracle used."""
    o = oracle(kind)
    shapes = {k: tuple(int(x) for x in s.split(",")) for k, s in zip(o["keys"].tolist(), o["shapes"].tolist())}
    assert shapes == ref_shapes(kind)
    sd = ref_state_dict(kind, SEEDS[kind])
    assert sum(float(v.double().abs().sum()) for v in sd.values()) == pytest.approx(float(o["weight_abs_sum"]), rel=1e-12)
    inp = ref_inputs(kind)
    for k in ("clean", "noised", "t", "y", "labels"):
        np.testing.assert_array_equal(inp[k].numpy(), o[k])


def test_image_config(tmp_path):
    model, info = converted("image", tmp_path)
    c = info.model_config
    assert (c.depth, c.hidden_size, c.num_heads, c.mlp_ratio) == (2, 128, 2, 4.0)
    assert (c.latent_channels, c.patch_size, c.num_classes) == (4, 1, 1000)
    assert (c.rope_axes, c.rope_split, c.rope_max_pos, c.rope_style) == (2, (1, 1), (8, 8), "reference")
    assert info.kind == "image" and info.latent_shape == (4, 8, 8) and info.block == (4, 4)
    assert (info.block_tokens, info.ar_len, info.cfg_scale, info.num_steps, info.scheduler) == (16, 4, 1.5, 25, "dpm")
    assert (info.pack.patch_size, info.pack.positions) == (1, "reference")
    sd = model.state_dict()
    ref = ref_state_dict("image", SEEDS["image"])
    assert torch.equal(sd["t_embedder.linear_1.weight"], ref["t_embedder.mlp.0.weight"])
    assert torch.equal(sd["t_embedder.linear_2.bias"], ref["t_embedder.mlp.2.bias"])
    assert torch.equal(sd["y_embedder.weight"], ref["y_embedder.embedding_table.weight"])
    assert torch.equal(sd["blocks.1.attn.q_norm.weight"], ref["blocks.1.attn.q_norm.weight"])
    assert not model.training


def test_video_config(tmp_path):
    _, info = converted("video", tmp_path)
    c = info.model_config
    assert (c.latent_channels, c.patch_size, c.num_classes) == (4, 2, 101)
    assert (c.rope_axes, c.rope_split, c.rope_max_pos) == (3, (2, 3, 3), (4, 4, 4))
    assert info.kind == "video" and info.latent_shape == (4, 4, 8, 8) and info.frames_per_block == 2
    assert (info.block_tokens, info.ar_len, info.cfg_scale) == (32, 2, 2.5)
    cfg = info.config
    assert cfg["pack"]["positions"] == "reference" and cfg["sampling"]["null_class"] == 101
    assert cfg["source"]["args"]["nd_split"] == "2_3_3"


@pytest.mark.parametrize("kind,name,args,want", [
    ("image", "ACDiT-H", dict(dataset="ImageNet", num_frames=1, image_size=256, patch_size=1, block_size=256,
                              ar_len=4), dict(block=(16, 16), rope=((1, 1), (32, 32)), classes=1000, P=4)),
    ("video", "ACDiT-XL", dict(dataset="UCF101", num_frames=16, image_size=256, patch_size=2, block_size=1024,
                               ar_len=4, nd_split="2_3_3"), dict(fpb=4, rope=((2, 3, 3), (16, 16, 16)), classes=101, P=16)),
])
def test_paper_settings(kind, name, args, want):
    """The published ImageNet 256 and UCF-101 settings, converted on meta tensors at full size."""
    depth, H, heads = C.REFERENCE_MODELS[name]
    a = argparse.Namespace(**{**TRAIN_DEFAULTS, "model": name, "vae_latent_size": 4, **args})
    shapes = C.reference_shapes(depth, H, 4 * H, want["P"], want["classes"])
    sd = {f"module.{k}": torch.empty(s, device="meta") for k, s in shapes.items()}
    conv = C.convert_checkpoint({"model": sd, "args": a}, "paper.pt")
    m, smp = conv.config["model"], conv.config["sampling"]
    assert (m["depth"], m["hidden_size"], m["num_heads"], m["num_classes"]) == (depth, H, heads, want["classes"])
    assert (tuple(m["rope_split"]), tuple(m["rope_max_pos"]), m["rope_style"]) == (*want["rope"], "reference")
    assert smp["ar_len"] == 4 and smp["scheduler"] == "dpm" and smp["num_steps"] == 25
    if kind == "image":
        assert tuple(smp["block"]) == want["block"] and smp["latent_shape"] == [4, 32, 32] and smp["cfg_scale"] == 1.5
    else:
        assert smp["frames_per_block"] == want["fpb"] and smp["latent_shape"] == [16, 4, 32, 32]
        assert smp["cfg_scale"] == 2.5


def test_ema_and_ddp_prefix(tmp_path):
    ck = ref_checkpoint("image")
    ck["ema"] = {f"module.{k}": v for k, v in ck["ema"].items()}
    src = tmp_path / "ddp.pt"
    torch.save(ck, src)
    model, info = C.load_converted(C.convert(src, tmp_path / "out", weights="ema"))
    ref = ref_state_dict("image", SEEDS["image"] + 1)
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], ref["blocks.0.mlp.fc1.weight"])
    assert info.config["source"]["weights"] == "ema"
    # a bfloat16 copy loads into a float32 model
    model16, _ = C.load_converted(C.convert(src, tmp_path / "out16", weights="ema", dtype="bfloat16"))
    w = model16.state_dict()["blocks.0.mlp.fc1.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, ref["blocks.0.mlp.fc1.weight"].bfloat16().float())


def test_cli(tmp_path):
    src = tmp_path / "video.pt"
    torch.save(ref_checkpoint("video"), src)
    r = subprocess.run([sys.executable, "-m", "unimodal.convert", str(src), str(tmp_path / "out"), "--ema"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "video model depth 2" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_cli_refusal(tmp_path, capsys):
    """A refusal: exit code 2, the reason on stderr, nothing written."""
    torch.save({"model": {}, "args": ref_args("video")}, tmp_path / "empty.pt")
    assert C.main([str(tmp_path / "empty.pt"), str(tmp_path / "out")]) == 2
    assert "missing key x_embedder.weight" in capsys.readouterr().err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_sample_command(tmp_path, capsys):
    """python -m unimodal.convert sample: latents, and PNGs decoded by a (tiny, random) SD-style VAE."""
    from PIL import Image as PILImage
    ckpt = converted_image_and_vae(tmp_path)
    out = tmp_path / "samples"
    assert C.main(["sample", str(ckpt), str(out), "--labels", "3", "7", "--steps", "2", "--device", "cpu",
                   "--vae", str(tmp_path / "vae")]) == 0
    lat = np.load(out / "latents.npy")
    assert lat.shape == (2, 4, 8, 8) and np.isfinite(lat).all()
    assert PILImage.open(out / "0001_class7.png").size == (64, 64)
    assert C.main(["sample", str(ckpt), str(out), "--labels", "1000"]) == 2
    assert "outside 0..999" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refusals

class Foreign:
    """Any class of the user's: not in the allowed set."""

    def __init__(self):
        self.payload = 1


class RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _refused(tmp_path: Path, ckpt, *match: str, weights: str = "model", overrides=None):
    src = tmp_path / "bad.pt"
    torch.save(ckpt, src)
    out = tmp_path / "out"
    with pytest.raises(C.ConvertError) as e:
        C.convert(src, out, weights=weights, overrides=overrides)
    for m in match:
        assert m in str(e.value), str(e.value)
    assert_nothing_written(tmp_path, out)
    return str(e.value)


def test_refuses_missing_key(tmp_path):
    ck = ref_checkpoint("image")
    del ck["model"]["blocks.1.attn.k_norm.weight"]
    _refused(tmp_path, ck, "missing key blocks.1.attn.k_norm.weight", "expected shape [64]")


def test_refuses_wrong_shape(tmp_path):
    ck = ref_checkpoint("video")
    ck["model"]["blocks.0.mlp.fc2.bias"] = torch.zeros(127)
    _refused(tmp_path, ck, "shape mismatch at blocks.0.mlp.fc2.bias: got [127], expected [128]")


def test_refuses_unknown_key(tmp_path):
    ck = ref_checkpoint("image")
    ck["model"]["pos_embed"] = torch.zeros(1, 64, 128)
    _refused(tmp_path, ck, "unknown key pos_embed (shape [1, 64, 128])")


def test_refuses_class_count_mismatch(tmp_path):
    """An ImageNet run has 1000 classes (+ the null row), as sample_img.py builds it."""
    ck = ref_checkpoint("image", dataset="Other", num_classes=10)
    _refused(tmp_path, ck, "y_embedder.embedding_table.weight: got [1001, 128], expected [11, 128]")


def test_refuses_wrong_model_name(tmp_path):
    _refused(tmp_path, ref_checkpoint("image", model="ACDiT-B"), "args.model 'ACDiT-B' means depth 12, hidden 768",
             "weights have depth 2, hidden 128")


def test_refuses_missing_ema_and_args(tmp_path):
    ck = ref_checkpoint("image")
    del ck["ema"]
    _refused(tmp_path, ck, "no 'ema' entry", weights="ema")
    ck = ref_checkpoint("image")
    del ck["args"]
    _refused(tmp_path, ck, "args lack", "--set")


def test_refuses_inconsistent_args(tmp_path):
    _refused(tmp_path, ref_checkpoint("image", ar_len=3), "spatial_len 64 x num_frames 1 != block_size 16 x ar_len 3")
    _refused(tmp_path, ref_checkpoint("video", block_size=8, ar_len=8), "not a whole number of frames")


def test_refuses_foreign_class(tmp_path):
    ck = ref_checkpoint("image")
    ck["extra"] = Foreign()
    msg = _refused(tmp_path, ck, "refused", "Foreign")
    assert "weights_only" not in msg  # no advice to turn the safety off


def test_refuses_code_execution(tmp_path):
    sentinel = tmp_path / "pwned"
    ck = ref_checkpoint("image")
    ck["args"] = RunsCode(sentinel)
    _refused(tmp_path, ck, "refused", "system")
    assert not sentinel.exists()


def test_refuses_non_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(C.ConvertError, match="not a readable torch checkpoint"):
        C.convert(tmp_path / "bad.pt", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_output(tmp_path):
    src = tmp_path / "image.pt"
    torch.save(ref_checkpoint("image"), src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(C.ConvertError, match="--overwrite"):
        C.convert(src, out)
    assert (out / "keep.txt").exists()
    C.convert(src, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- parity with the reference

def _packed_forward(model, info, inp, one_row: bool = False):
    """The reference's training inputs (N, T, B, C) as one packed batch of single-segment samples
    (one row each, or all in one row), run through the converted model; returns its noised-token
    outputs in the reference layout."""
    clean, noised = inp["clean"], inp["noised"]
    samples = [info.sample(info.from_reference_tokens(clean[n]), int(inp["y"][n])) for n in range(clean.shape[0])]
    packed = pack(samples, info.pack, max_len=2 * clean[0].numel() // clean.shape[-1] * len(samples) if one_row else None)
    assert packed.tokens.shape[0] == (1 if one_row else len(samples))
    patches = packed.patches.clone()
    recs = [r for r in packed.records]
    assert [r.sample for r in recs] == list(range(clean.shape[0]))
    for n, r in enumerate(recs):
        # the packing reproduces the reference's token order
        torch.testing.assert_close(patches[r.row, r.clean_idx], clean[n].reshape(-1, clean.shape[-1]), rtol=0, atol=0)
        patches[r.row, r.noisy_idx] = noised[n].reshape(-1, noised.shape[-1])
    blocks = torch.cat([torch.tensor(r.blocks) for r in recs])
    t = torch.empty(packed.n_blocks, dtype=torch.long)
    t[blocks] = inp["t"].reshape(-1)
    y = torch.where(packed.block_label < 0, torch.full_like(packed.block_label, info.num_classes), packed.block_label)
    with torch.no_grad():
        out = model(model_input(packed, patches, t, y))
    return torch.stack([out.eps[r.row, r.noisy_idx] for r in recs])  # (N, T*B, C)


@pytest.mark.parametrize("backend,one_row", [("auto", False), ("sdpa", False), ("auto", True)])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_training_forward_matches_reference(kind, backend, one_row, tmp_path):
    o = oracle(kind)
    model, info = converted(kind, tmp_path)
    model.cfg.attn_backend = backend
    got = _packed_forward(model, info, ref_inputs(kind), one_row)
    want = torch.from_numpy(o["forward"])
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < 1e-4, err
    assert want.abs().max() > 0.5  # a non-trivial output


@pytest.mark.parametrize("mode", ["cache", "recompute"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_sampling_matches_reference(kind, mode, tmp_path):
    """The reference draws each block's initial noise as randn((N, 1, B, C), generator) in block
    order, then runs the DPM-Solver steps of that block with CFG; the project's block sampler
    draws randn((N, B, C)) per block from the same generator. With random weights the model's
    epsilon does not match the noise, so 4 solver steps end at values of several hundred: the
    comparison is at fp32 rounding relative to that scale (2e-6 of the largest value)."""
    o = oracle(kind)
    model, info = converted(kind, tmp_path)
    s = SAMPLING[kind]
    for name, cfg in (("sample", s["cfg"]), ("sample_nocfg", 1.0)):
        lat = info.generate(model, torch.tensor(s["labels"]), cfg_scale=cfg, steps=s["steps"],
                            generator=torch.Generator().manual_seed(s["seed"]), mode=mode)
        got = torch.stack([info.to_reference_tokens(x) for x in lat])  # (N, T, B, C)
        want = torch.from_numpy(o[name])
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= 2e-6 * want.abs().max().item(), (name, err, want.abs().max().item())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fixtures":
        write_fixtures(sys.argv[2])
    else:
        print("usage: python tests/test_convert.py fixtures DIR", file=sys.stderr)
        sys.exit(2)


def test_evaluate_a_converted_checkpoint_against_an_image_folder(tmp_path, monkeypatch):
    """evaluate.py on a converted checkpoint: samples, grid, and FID / precision / recall against a folder
    reference (the real Inception); a latent-cache reference is refused before any sampling."""
    import json
    import evaluate
    from PIL import Image as PILImage
    ckpt = converted_image_and_vae(tmp_path)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "ref" / c).mkdir(parents=True)
        for i in range(4):
            PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref" / c / f"{i}.png")
    import functools
    from unimodal import metrics as M
    monkeypatch.setattr(M, "reference_stats", functools.partial(M.reference_stats, cache_dir=tmp_path / "stats"))
    common = ["--samples", "5", "--batch", "2", "--steps", "2", "--device", "cpu", "--vae", str(tmp_path / "vae")]
    evaluate.main([str(ckpt), *common, "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "ev")])
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert m["samples"] == 5 and m["reference_images"] == 8 and np.isfinite(m["fid"]) and m["fid"] > 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    with np.load(tmp_path / "ev/samples.npz") as z:
        assert z["arr_0"].shape == (5, 64, 64, 3) and z["labels"].tolist() == [0, 1, 2, 3, 4]
    assert PILImage.open(tmp_path / "ev/grid.png").size[0] > 64
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents/meta.json").write_text("{}")
    sampled = []
    import unimodal.shards as shards
    monkeypatch.setattr(shards, "sample_set", lambda *a, **k: sampled.append(1))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(ckpt), *common, "--reference", str(tmp_path / "latents"), "--out", str(tmp_path / "ev2")])
    assert e.value.code == 2 and sampled == []
