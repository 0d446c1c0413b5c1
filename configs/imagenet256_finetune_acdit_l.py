"""ImageNet 256 fine-tuning of a pretrained ACDiT-L (configs/imagenet256_acdit_l.py): the transfer to
visual understanding, with the hyperparameters of MAE's ViT-L fine-tuning (FINETUNE.md). Images enter
as clean blocks (SD-VAE latents 32x32x4, patch 1, blocks of 256 patches, the generator's shape), their
final hidden states are mean-pooled into a linear head. Batch 1024, lr 1e-3 x 1024/256, layer decay
0.75, AdamW (0.9, 0.999), weight decay 0.05, 5 warmup epochs then cosine to 1e-6 over 50 epochs,
label smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5) on the latents, horizontal flips, no EMA.
Not reproduced, so expect a lower top-1 than MAE's recipe gives: its RandomResizedCrop (scale 0.08-1),
RandAugment and random erasing (pixel-space augmentations; the latents here are of the ADM centre
crop), drop path 0.2 (the model has none), and the fresh LayerNorm after pooling (the generator's own
final norm is used, per token, before pooling).

task.dataset / task.test_dataset are the ImageNet train / val folders; latent caches from
tokenizers/cache_latents.py (train with --flip) are much faster, the VAE then never runs:
    accelerate launch --num_processes 8 train.py configs/imagenet256_finetune_acdit_l.py \\
        init_from=runs/imagenet256_acdit_l task.dataset=runs/latents/in256 task.test_dataset=runs/latents/in256-val
"""
from pathlib import Path

from tasks.classify import ClassifyConfig
from unimodal.config import OptimConfig, TrainConfig, load_config

gen = load_config(Path(__file__).with_name("imagenet256_acdit_l.py"))
images, batch, epochs, warmup_epochs = 1_281_167, 1024, 50, 5
steps, warmup = epochs * images // batch, warmup_epochs * images // batch
lr = 1e-3 * batch / 256
config = TrainConfig(
    task=ClassifyConfig(dataset="/data/imagenet/train", test_dataset="/data/imagenet/val", test_split="val",
                        image_size=256, num_classes=1000, codec="vae", vae_path=gen.task.vae_path,
                        block=gen.task.block, head_init_std=2e-5, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                        mix_prob=1.0, switch_prob=0.5, hflip=True, eval_batch=250),
    model=gen.model,
    optim=OptimConfig(lr=lr, betas=(0.9, 0.999), weight_decay=0.05, warmup_steps=warmup,
                      decay_frac=1 - warmup / steps, decay_type="cosine", min_lr_ratio=1e-6 / lr,
                      grad_clip=0.0, layer_decay=0.75),
    steps=steps,
    global_batch=batch,
    precision="bf16",
    ema_decay=0.0,
    log_every=100,
    ckpt_every=5000,
    init_from=gen.out_dir,
    out_dir="runs/imagenet256_finetune_acdit_l",
)
