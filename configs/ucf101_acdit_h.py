"""UCF-101 class-conditional video generation with ACDiT-H: configs/ucf101_acdit_xl.py's paper
setting (16 frames, SD-VAE latents, patch 2, blocks of 4 frames, batch 96, CFG 2.5) with the H model.

    accelerate launch --num_processes 8 train.py configs/ucf101_acdit_h.py task.dataset=/data/latents/ucf101-16x256
"""
import dataclasses
from pathlib import Path

from unimodal.config import load_config

_base = load_config(Path(__file__).with_name("ucf101_acdit_xl.py"))
config = dataclasses.replace(
    _base,
    model=_base.model.sized_as("ACDiT-H"),
    out_dir="runs/ucf101_acdit_h",
)
