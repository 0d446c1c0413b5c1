"""Class-conditional MNIST in pixel space, the embedded default (`make demo`).

28x28 digits, patch 7 -> a 4x4 token grid cut into 4 blocks of 2x2 patches (4 autoregressive
steps, as in the paper's ImageNet setting; each block is one 14x14 quadrant). Training fits its step count
to a wall-time budget (time_limit_min) measured after the first steps; evaluation samples
class-balanced digits with DPM-Solver and guidance, writes a 10x10 class grid and scores them
with the project's MNIST classifier."""
from tasks.class_image import ClassImageConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=ClassImageConfig(dataset="mnist", image_size=28, num_classes=10, codec="pixel", block=4,
                          snr_gamma=5.0, cfg_scale=4.0, sample_steps=25, eval_samples=200, eval_batch=100),
    model=ModelConfig(depth=6, hidden_size=256, num_heads=4, mlp_act="gelu", latent_channels=1, patch_size=7,
                      num_classes=10, class_embed_std=1.0, rope_axes=3, rope_split=(2, 3, 3),
                      rope_max_pos=(32, 32, 32)),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, decay_frac=0.3, grad_clip=1.0),
    steps=6000,
    time_limit_min=7.0,
    global_batch=64,
    precision="auto",  # bf16 autocast where the CPU computes bf16 natively, else fp32
    ema_decay=0.999,
    log_every=20,
    ckpt_every=500,
    sample_every=0,
    out_dir="runs/mnist_class_tiny",
)
