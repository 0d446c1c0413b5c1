"""Class-conditional one-digit Moving MNIST in pixel space, sized for a 2-core CPU: 8 frames of
32x32, patch 4 -> 8x8 tokens a frame, blocks of 2 frames (4 AR steps of 128 tokens), guidance 2.5.
Evaluation writes a GIF/MP4 grid, a 16-frame GIF (twice the trained length) and the MNIST
classifier's accuracy on the generated frames.

    python train.py configs/moving_mnist_video_tiny.py
"""
from tasks.class_video import ClassVideoConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=ClassVideoConfig(dataset="moving_mnist", frames=8, image_size=32, num_classes=10, num_clips=10000,
                          speed=(1.0, 3.0), codec="pixel", frames_per_block=2, cfg_scale=2.5, sample_steps=25,
                          eval_samples=100, eval_batch=50, extend_frames=16),
    model=ModelConfig(depth=4, hidden_size=128, num_heads=2, mlp_act="gelu", latent_channels=1, patch_size=4,
                      num_classes=10, rope_axes=3, rope_split=(2, 3, 3), rope_max_pos=(16, 8, 8)),
    optim=OptimConfig(lr=1e-3, warmup_steps=50, decay_frac=0.3, grad_clip=1.0),
    steps=1000,
    time_limit_min=8.0,
    global_batch=8,
    precision="fp32",  # bf16 autocast is slower than fp32 for models this small on CPU
    ema_decay=0.999,
    log_every=20,
    ckpt_every=250,
    sample_every=0,
    out_dir="runs/moving_mnist_video_tiny",
)
