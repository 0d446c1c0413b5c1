"""ImageNet 256 linear probe of a pretrained ACDiT-L (configs/imagenet256_acdit_l.py), MAE's
protocol: frozen backbone, images as clean blocks (SD-VAE latents 32x32x4, patch 1, blocks of 256
patches, the generator's shape), final hidden states mean-pooled over the blocks pretraining used as
context (pool="context": the last clean block is never attended to in training), computed once for train and val
(1.28M x 1024 floats, 5.2 GB in memory), then BatchNorm(affine=False) + linear head for 90 epochs
at batch 16384, 10 warmup epochs, cosine decay, no weight decay. MAE trains the head with LARS
(base lr 0.1); here it is train.py's AdamW at a large lr (untuned at this scale). No
augmentation: the features are computed once.

    accelerate launch --num_processes 8 train.py configs/imagenet256_probe_acdit_l.py \\
        init_from=runs/imagenet256_acdit_l task.dataset=runs/latents/in256 task.test_dataset=runs/latents/in256-val
"""
from pathlib import Path

from tasks.linear_probe import LinearProbeConfig
from unimodal.config import OptimConfig, TrainConfig, load_config

gen = load_config(Path(__file__).with_name("imagenet256_acdit_l.py"))
images, batch, epochs, warmup_epochs = 1_281_167, 16384, 90, 10
steps, warmup = epochs * images // batch, warmup_epochs * images // batch
config = TrainConfig(
    task=LinearProbeConfig(dataset="/data/imagenet/train", test_dataset="/data/imagenet/val", test_split="val",
                           image_size=256, num_classes=1000, codec="vae", vae_path=gen.task.vae_path,
                           block=gen.task.block, head_init_std=0.01, eval_batch=250, pool="context"),
    model=gen.model,
    optim=OptimConfig(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=warmup,
                      decay_frac=1 - warmup / steps, decay_type="cosine", grad_clip=0.0),
    steps=steps,
    global_batch=batch,
    precision="bf16",
    ema_decay=0.0,
    log_every=10,
    ckpt_every=1000,
    init_from=gen.out_dir,
    out_dir="runs/imagenet256_probe_acdit_l",
)
