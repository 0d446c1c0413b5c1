"""KJV language modelling with a 2048-token ByteLevel BPE trained on the KJV train split (cached):
windows of 128 tokens, a 4-layer, 192-wide model (text positions (p, p, p) on the shared 3-axis
RoPE layout). Evaluation reports held-out
perplexity and bits per byte and writes greedy / nucleus samples.

    python train.py configs/kjv_text_tiny.py
    python train.py configs/kjv_text_tiny.py task.tokenizer=gpt2 model.vocab_size=0   # the GPT-2 BPE
"""
from tasks.text_lm import TextLMConfig
from unimodal.config import ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    task=TextLMConfig(dataset="kjv", tokenizer="bpe", vocab_size=2048, seq_len=128, eval_batch=32),
    # vocab_size 0: taken from the tokenizer; latent/patch settings are unused by a text-only model
    model=ModelConfig(depth=4, hidden_size=192, num_heads=3, mlp_act="gelu", vocab_size=0, latent_channels=1,
                      patch_size=1, num_classes=0, rope_axes=3, rope_split=(2, 3, 3), rope_max_pos=(128, 128, 128)),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, decay_frac=0.3, grad_clip=1.0),
    steps=3000,
    time_limit_min=8.0,
    global_batch=16,
    precision="fp32",  # bf16 autocast is slower than fp32 for models this small on CPU
    ema_decay=0.0,
    log_every=20,
    ckpt_every=250,
    sample_every=0,
    out_dir="runs/kjv_text_tiny",
)
