"""Language modelling on the King James Bible (or any text corpus unimodal.data can read).

The training split is tokenized once into one stream: every verse followed by <|endoftext|>.
A sample is a window of `seq_len` tokens, one text segment trained with next-token cross-
entropy; windows overlap by one token, so every token of the stream but the first is a target
exactly once per epoch. The tokenizer is a ByteLevel BPE of `vocab_size` tokens trained on the
training split (unimodal.codecs.train_bpe, cached under the asset cache), the GPT-2 BPE
("gpt2"), or a tokenizer.json path.

Evaluation runs the held-out split (KJV: every 20th chapter) through the same windows and
reports the token-level perplexity and bits per byte (the summed cross-entropy over the
UTF-8 bytes of the predicted tokens, each separator counted as one byte, like a newline):
bits per byte does not depend on the tokenizer. It also writes greedy and nucleus samples
continuing a few prompts to samples.txt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unimodal import data as D
from unimodal.assets import cache_dir
from unimodal.codecs import EOT, TextCodec, train_bpe
from unimodal.diffusion import model_input
from unimodal.sampling import SequenceSampler
from unimodal.sequence import IGNORE, PackSpec, Sample, Text, pack

from .base import Task, check_config

PROMPTS = ("In the beginning", "And the LORD said unto Moses,", "Blessed are the", "For God so loved")


@dataclass
class TextLMConfig:
    dataset: str = "kjv"  # kjv | a .txt / .jsonl corpus (unimodal.data.text_file)
    tokenizer: str = "bpe"  # bpe (trained on the training split and cached) | gpt2 | a tokenizer.json path
    vocab_size: int = 2048  # size of the trained BPE, special tokens included
    seq_len: int = 128  # tokens per training window
    eval_batch: int = 32  # windows per evaluation forward
    eval_tokens: int = 0  # score at most this many held-out tokens (0: the whole split)
    prompts: tuple[str, ...] = PROMPTS
    sample_tokens: int = 48  # new tokens per sample
    samples_per_prompt: int = 2  # nucleus samples per prompt (plus one greedy)
    temperature: float = 0.8
    top_p: float = 0.9

    def __post_init__(self) -> None:
        check_config(self, ("vocab_size", "seq_len", "eval_batch", "sample_tokens"),
                     ("eval_tokens", "samples_per_prompt", "temperature", "top_p"))


def bpe_codec(dataset: str, vocab_size: int) -> TextCodec:
    """A ByteLevel BPE trained on the dataset's training split, cached under the asset cache."""
    name = dataset if dataset in D.DATASETS else \
        f"{Path(dataset).stem}-{hashlib.sha256(str(Path(dataset).resolve()).encode()).hexdigest()[:8]}"
    path = cache_dir() / "tokenizers" / f"{name}-bpe{vocab_size}.json"
    if not path.exists():
        texts = [str(s) for s in D.build_dataset(dataset, "train")[:]["text"]]
        tok = train_bpe(texts, vocab_size, special_tokens=(EOT,), show_progress=False, length=len(texts))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return TextCodec.from_file(path)


def build_codec(t: TextLMConfig) -> TextCodec:
    if t.tokenizer == "bpe":
        codec = bpe_codec(t.dataset, t.vocab_size)
    elif t.tokenizer == "gpt2":
        codec = TextCodec.gpt2()
    else:
        codec = TextCodec.from_file(t.tokenizer)
    codec.add_special_tokens([EOT])
    return codec


def token_bytes(codec: TextCodec) -> np.ndarray:
    """(V,) UTF-8 bytes each token stands for. A ByteLevel token spells one character per byte;
    added special tokens (the separator) count as one byte. Other tokenizers: the bytes of the
    token decoded alone (approximate where tokens split characters)."""
    from tokenizers import pre_tokenizers

    tok = codec.tokenizer
    added = set(tok.get_added_tokens_decoder())
    byte_level = isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
    return np.array([1 if i in added else len(tok.id_to_token(i)) if byte_level else len(codec.decode([i]).encode())
                     for i in range(codec.vocab_size)], np.int64)


class TextLMTask(Task):
    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        t = self.tc = cfg.task
        if t.seq_len < 2:
            raise ValueError(f"task.seq_len must be >= 2, got {t.seq_len}")
        self.codec = build_codec(t)
        self.eot = self.codec.eot_id
        self.spec = PackSpec(patch_size=cfg.model.patch_size, latent_channels=cfg.model.latent_channels)
        self._streams: dict[str, tuple[torch.Tensor, int]] = {}

    def model_config(self):
        m = self.cfg.model
        V = self.codec.vocab_size
        if m.vocab_size == 0:
            return dataclasses.replace(m, vocab_size=V)
        if m.vocab_size < V:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {V} tokens")
        return m

    # -------------------------------------------------------------- data
    def stream(self, split: str) -> tuple[torch.Tensor, int]:
        """(all tokens of the split: each verse then the separator, its UTF-8 byte count with one byte
        per separator)."""
        if split not in self._streams:
            texts = [str(s) for s in D.build_dataset(self.tc.dataset, split)[:]["text"]]
            ids = self.codec.encode_batch(texts)
            flat = np.fromiter((i for seq in ids for i in (*seq, self.eot)), dtype=np.int64)
            n_bytes = sum(len(s.encode()) + 1 for s in texts)
            self._streams[split] = (torch.from_numpy(flat), n_bytes)
        return self._streams[split]

    def windows(self, split: str) -> int:
        n = len(self.stream(split)[0])
        return max(0, (n - 1) // (self.tc.seq_len - 1))

    def window(self, split: str, i: int) -> torch.Tensor:
        """Window i: tokens [i (L-1), i (L-1) + L) of the stream."""
        L = self.tc.seq_len
        return self.stream(split)[0][i * (L - 1): i * (L - 1) + L]

    def dataset_size(self) -> int:
        n = self.windows("train")
        if n == 0:
            raise ValueError(f"the training split has fewer than seq_len={self.tc.seq_len} tokens")
        return n

    def batch(self, step: int):
        idx, pos = self.indices(step)
        samples = [Sample([Text(self.window("train", i))]) for i in idx]
        return pack(samples, self.spec).to(self.device), self.generators(step, pos)

    def loss(self, model, batch):
        """Next-token cross-entropy (the text part of diffusion.training_loss, which needs a block
        to noise; this sequence has none)."""
        packed, _ = batch
        logits, tgt = self.logits(model, packed)
        ce = F.cross_entropy(logits.float(), tgt)
        return ce, {"text": ce.detach()}

    def logits(self, model, packed) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) logits at every position with a next-token target, and the (N,) targets."""
        sel = packed.text_target != IGNORE  # (B, L)
        empty = torch.zeros(0, dtype=torch.long, device=packed.tokens.device)  # no noised blocks to condition
        out = model(model_input(packed, packed.patches, empty, empty), logits_at=sel)
        return out.logits, packed.text_target[sel]

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score(self, model, split: str = "test", max_tokens: int = 0) -> dict:
        """Summed next-token cross-entropy over the split's windows -> perplexity, bits per byte."""
        nb = torch.as_tensor(token_bytes(self.codec))
        n_win = self.windows(split)
        if max_tokens:
            n_win = min(n_win, max(1, max_tokens // (self.tc.seq_len - 1)))
        if n_win == 0:
            raise ValueError(f"the {split} split has fewer than seq_len={self.tc.seq_len} tokens")
        nll, n_tok, n_bytes = 0.0, 0, 0
        for s in range(0, n_win, self.tc.eval_batch):
            samples = [Sample([Text(self.window(split, i))]) for i in range(s, min(s + self.tc.eval_batch, n_win))]
            logits, tgt = self.logits(model, pack(samples, self.spec).to(self.device))  # (N, V), (N,)
            nll += float(F.cross_entropy(logits.float(), tgt, reduction="sum"))
            n_tok += tgt.numel()
            n_bytes += int(nb[tgt.cpu()].sum())
        return {"loss": nll / n_tok, "perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes,
                "eval_tokens": n_tok, "eval_bytes": n_bytes}

    @torch.no_grad()
    def complete(self, model, prompt: str, rows: int, temperature: float, top_p: float = 1.0,
                 max_new: int | None = None, seed: int = 0) -> list[str]:
        """Continue `prompt` (after a separator, as at the start of a verse) in `rows` rows."""
        t = self.tc
        max_new = max_new or t.sample_tokens
        ids = torch.tensor([self.eot] + self.codec.encode(prompt))
        s = SequenceSampler(model, self.spec, rows, max_len=len(ids) + max_new + 4,
                            generator=torch.Generator().manual_seed(seed), precision=self.cfg.precision)
        s.feed_text(ids)
        out = s.text(max_new, temperature=temperature, top_p=top_p, stop=[self.eot])  # (rows, n)
        texts = []
        for row in out.tolist():
            if self.eot in row:
                row = row[:row.index(self.eot)]
            texts.append(prompt + self.codec.decode(row))
        return texts

    def preview(self, model, out_dir: Path, step: int) -> list[Path]:
        path = Path(out_dir) / f"samples_step{step:07d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.complete(model, p, 1, 0.0) for p in self.tc.prompts) + "\n")
        return [path]

    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        t = self.tc
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        max_tokens = t.eval_tokens or (20000 if quick else 0)
        metrics = self.score(model, "test", max_tokens)
        metrics.update(vocab_size=self.codec.vocab_size, uniform_perplexity=float(self.codec.vocab_size),
                       tokenizer=t.tokenizer)
        lines = []
        for i, prompt in enumerate(t.prompts):
            lines.append(f"## {prompt}")
            lines.append("greedy: " + self.complete(model, prompt, 1, 0.0, seed=i)[0])
            for j, txt in enumerate(self.complete(model, prompt, t.samples_per_prompt, t.temperature, t.top_p, seed=i)):
                lines.append(f"top_p={t.top_p} T={t.temperature} #{j}: {txt}")
            lines.append("")
        (out_dir / "samples.txt").write_text("\n".join(lines))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
