"""Fine-tune the class-conditional MNIST generator (configs/mnist_class_tiny.py) as a classifier:
clean blocks in, mean-pooled final hidden states, a linear head; the MAE fine-tuning recipe
scaled down (layer decay 0.75, AdamW, warmup then cosine, weight decay 0.05, label smoothing
0.1; random shifts of up to 2 pixels in place of MAE's random resized crops; no mixup / cutmix,
which blur digits more than they regularise a model this small). Measured here from the demo
generator after 1500 steps: 98.8% top-1 on the 10k MNIST test digits (3000 steps, 14 min).
The backbone shape and blocking are the generator config's, so its checkpoints load.

    python train.py configs/mnist_class_tiny.py
    python train.py configs/mnist_finetune_tiny.py                   # init_from=runs/mnist_class_tiny
"""
from pathlib import Path

from tasks.classify import ClassifyConfig
from unimodal.config import OptimConfig, TrainConfig, load_config

gen = load_config(Path(__file__).with_name("mnist_class_tiny.py"))
steps, warmup = 3000, 100
config = TrainConfig(
    task=ClassifyConfig(dataset="mnist", image_size=gen.task.image_size, num_classes=10, codec="pixel", block=gen.task.block,
                        label_smoothing=0.1, shift=2, mixup=0.0, cutmix=0.0, head_init_std=2e-5, eval_batch=500),
    model=gen.model,
    optim=OptimConfig(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, warmup_steps=warmup,
                      decay_frac=1 - warmup / steps, decay_type="cosine", grad_clip=0.0, layer_decay=0.75),
    steps=steps,
    global_batch=64,
    precision="auto",  # bf16 autocast where the CPU computes bf16 natively, else fp32
    ema_decay=0.0,
    log_every=20,
    ckpt_every=1000,
    init_from=gen.out_dir,
    out_dir="runs/mnist_finetune_tiny",
)
