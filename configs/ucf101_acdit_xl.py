"""UCF-101 class-conditional video generation with ACDiT-XL, the paper's setting: 16 frames of
256x256 through the SD VAE (f8) -> latents 16x32x32x4, patch 2 -> 16x16 tokens a frame, blocks
of 4 frames (1024 tokens, 4 AR steps), 101 classes, batch 96, AdamW lr 3e-4 without weight
decay, warmup-stable-decay over the last 15%, EMA 0.9999, DPM-Solver 25 steps per block,
guidance 2.5. RoPE over 3 axes (t, h, w) in the reference layout (split 2:3:3, lengths 16), so a
checkpoint converted from the official release (python -m unimodal.convert) fits this model.

The schedule length (`steps`) and the frame stride (3, as Latte's UCF-101 setting) are choices of
this file, not numbers from the paper. Train from a latent cache to skip the VAE in the loop:
    python tokenizers/cache_latents.py --dataset /data/UCF-101 \\
        --dataset-kw '{"frames": 16, "stride": 3, "size": 256}' --codec vae --vae /models/sd-vae-ft-ema \\
        --flip --out /data/latents/ucf101-16x256
    accelerate launch --num_processes 8 train.py configs/ucf101_acdit_xl.py task.dataset=/data/latents/ucf101-16x256
A latent cache holds one 16-frame crop per video (from frame 0); trained from the videos, each visit
draws its crop's first frame (task.temporal_crop="random") and the VAE runs in the loop.
FVD (task.fvd=True) needs the real clips: task.fvd_reference=/data/UCF-101.
"""
from tasks.class_video import ClassVideoConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=ClassVideoConfig(dataset="/data/UCF-101", frames=16, image_size=256, num_classes=101, frame_stride=3, fold=1,
                          codec="vae", vae_path="/models/sd-vae-ft-ema", positions="reference", frames_per_block=4,
                          hflip=True, class_dropout=0.1, cfg_scale=2.5, sample_steps=25, scheduler="dpm",
                          eval_samples=2048, eval_batch=32, extend_frames=32, fvd=True, fvd_reference="/data/UCF-101",
                          fvd_reference_clips=2048),
    model=ModelConfig.preset("ACDiT-XL", latent_channels=4, patch_size=2, num_classes=101, rope_axes=3,
                             rope_split=(2, 3, 3), rope_max_pos=(16, 16, 16), rope_style="reference"),
    optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0, decay_frac=0.15, grad_clip=1.0),
    steps=200_000,
    global_batch=96,
    precision="bf16",
    ema_decay=0.9999,
    ema_warmup=False,  # the reference (DiT) keeps 0.9999 from the first step, the EMA starting as a copy
    log_every=100,
    ckpt_every=10_000,
    sample_every=10_000,
    out_dir="runs/ucf101_acdit_xl",
)
