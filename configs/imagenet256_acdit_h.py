"""ImageNet 256 class-conditional generation with ACDiT-H: configs/imagenet256_acdit_l.py's
paper setting (SD-VAE latents 32x32x4, patch 1, block 256, 4 AR steps, batch 1024, AdamW 3e-4,
WSD over the last 15%, EMA 0.9999, DPM-Solver 25 steps, CFG 1.5) with the H model."""
import dataclasses
from pathlib import Path

from unimodal.config import load_config

_base = load_config(Path(__file__).with_name("imagenet256_acdit_l.py"))
config = dataclasses.replace(
    _base,
    model=_base.model.sized_as("ACDiT-H"),
    out_dir="runs/imagenet256_acdit_h",
)
