"""Class-conditional MNIST in pixel space, the embedded default (`make demo`): 32x32 (padded),
patch 2 -> 16x16 tokens, 4 blocks of 8x8 patches (4 AR steps, as the paper's ImageNet setting)."""
from tasks.class_image import ClassImageConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=ClassImageConfig(dataset="mnist", image_size=32, num_classes=10, codec="pixel", block=64,
                          cfg_scale=1.5, sample_steps=25, eval_samples=1000, eval_batch=250),
    model=ModelConfig(depth=6, hidden_size=192, num_heads=3, latent_channels=1, patch_size=2, num_classes=10,
                      rope_axes=3, rope_split=(2, 3, 3), rope_max_pos=(32, 32, 32)),
    optim=OptimConfig(lr=1e-3, warmup_steps=100, decay_frac=0.3, grad_clip=1.0),
    steps=2000,
    global_batch=64,
    precision="bf16",
    ema_decay=0.999,
    log_every=20,
    ckpt_every=500,
    sample_every=0,
    out_dir="runs/mnist_class_tiny",
)
