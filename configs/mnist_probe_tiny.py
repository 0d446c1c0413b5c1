"""Linear probe of the class-conditional MNIST generator (configs/mnist_class_tiny.py): frozen
backbone, clean blocks in, final hidden states mean-pooled over the blocks pretraining used as
context (the last quadrant's clean copy is never attended in image training, so it is left out),
computed once for the train and test sets, then BatchNorm(affine=False) + linear head trained
with AdamW at a large lr, no weight decay. The backbone shape and blocking are the generator config's, so its checkpoints load.

    python train.py configs/mnist_class_tiny.py
    python train.py configs/mnist_probe_tiny.py                      # init_from=runs/mnist_class_tiny
"""
from pathlib import Path

from tasks.linear_probe import LinearProbeConfig
from unimodal.config import OptimConfig, TrainConfig, load_config

gen = load_config(Path(__file__).with_name("mnist_class_tiny.py"))
steps, warmup = 2000, 100
config = TrainConfig(
    task=LinearProbeConfig(dataset="mnist", image_size=gen.task.image_size, num_classes=10, codec="pixel", block=gen.task.block,
                           pool="context", head_init_std=0.01, eval_batch=500),
    model=gen.model,
    optim=OptimConfig(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=warmup,
                      decay_frac=1 - warmup / steps, decay_type="cosine", grad_clip=0.0),
    steps=steps,
    global_batch=256,
    precision="auto",  # bf16 autocast where the CPU computes bf16 natively, else fp32
    ema_decay=0.0,
    log_every=100,
    ckpt_every=2000,
    init_from=gen.out_dir,
    out_dir="runs/mnist_probe_tiny",
)
