"""ImageNet 256 class-conditional generation with ACDiT-L, the paper's setting: SD-VAE (f8)
latents 32x32x4, patch 1, blocks of 256 patches (16x16 squares), 4 AR steps, batch 1024, AdamW
lr 3e-4 without weight decay, warmup-stable-decay over the last 15%, EMA 0.9999, DPM-Solver
25 steps per block, guidance 1.5.

Set task.dataset to an ImageFolder root (or a latent cache from tokenizers/cache_latents.py)
and task.vae_path to a local copy of the SD VAE, e.g.
    accelerate launch --num_processes 8 train.py configs/imagenet256_acdit_l.py \
        task.dataset=/data/imagenet/train task.vae_path=/models/sd-vae-ft-ema
"""
from tasks.class_image import ClassImageConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=ClassImageConfig(dataset="/data/imagenet/train", image_size=256, num_classes=1000, codec="vae",
                          vae_path="/models/sd-vae-ft-ema", block=256, hflip=True, class_dropout=0.1,
                          cfg_scale=1.5, sample_steps=25, scheduler="dpm", eval_samples=50000, eval_batch=250,
                          fid=True),
    model=ModelConfig.preset("ACDiT-L", latent_channels=4, patch_size=1, num_classes=1000,
                             rope_axes=3, rope_split=(2, 3, 3), rope_max_pos=(64, 64, 64)),
    optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0, decay_frac=0.15,
                      grad_clip=1.0),
    steps=400_000,
    global_batch=1024,
    precision="bf16",
    ema_decay=0.9999,
    ema_warmup=False,  # the reference (DiT) keeps 0.9999 from the first step, the EMA starting as a copy
    log_every=100,
    ckpt_every=10_000,
    sample_every=10_000,
    out_dir="runs/imagenet256_acdit_l",
)
