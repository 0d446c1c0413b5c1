"""Text and images in one model: MNIST digits with generated captions, half the samples caption ->
image, half image -> caption, no class labels. 32x32 pixels, patch 4 -> 8x8 tokens, blocks of 4x4
patches (4 AR steps), a word-level caption vocabulary. Evaluation: classifier accuracy of images
generated from captions, and digit-word accuracy of greedy captions of real test images.

    python train.py configs/mnist_mixed_tiny.py
"""
from tasks.mixed_caption import MixedCaptionConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=MixedCaptionConfig(image_size=32, block=16, sample_steps=25, eval_samples=200, eval_batch=100),
    # vocab_size 0: taken from the caption tokenizer; no class labels (num_classes 0)
    model=ModelConfig(depth=4, hidden_size=128, num_heads=2, mlp_act="gelu", latent_channels=1, patch_size=4,
                      num_classes=0, vocab_size=0, rope_axes=3, rope_split=(2, 3, 3), rope_max_pos=(32, 32, 32)),
    optim=OptimConfig(lr=1e-3, warmup_steps=50, decay_frac=0.3, grad_clip=1.0),
    steps=1500,
    time_limit_min=8.0,
    global_batch=32,
    precision="fp32",  # bf16 autocast is slower than fp32 for models this small on CPU
    ema_decay=0.999,
    log_every=20,
    ckpt_every=500,
    sample_every=0,
    out_dir="runs/mnist_mixed_tiny",
)
