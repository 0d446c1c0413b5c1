"""Text and images in one model and one sequence format: MNIST digits with generated captions.

Every sample is one of two sequences, chosen 50/50 from its own generator, with a caption from
one of a few templates ("a handwritten seven", "the digit seven", ...), also chosen per sample:

    caption -> image   [Text(caption <boi>), Image(digit), Text(<eoi>)]
    image -> caption   [Text(<boi>), Image(digit), Text(<eoi> caption <|endoftext|>)]

There is no class label: the text is the conditioning. Text is trained with next-token cross-
entropy, image blocks with the diffusion loss; one loss, one model. The tokenizer is a word-
level vocabulary of the templates' words plus the special tokens.

Evaluation runs the SequenceSampler over one KV cache per batch:
- caption -> image: feed caption + <boi>, sample the image blocks, classify them with the
  project MNIST classifier: `caption_to_image_accuracy` is the fraction showing the digit the
  caption asked for. A PNG grid (one column per digit) and its captions are written.
- image -> caption: feed <boi>, the clean blocks of a real MNIST test image and <eoi>, then
  decode greedily until <|endoftext|>: `image_to_caption_accuracy` is the fraction of captions
  whose digit word names the image's digit; `caption_well_formed` the fraction that are exactly
  one of the templates.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from unimodal import data as D
from unimodal.codecs import EOT, PixelCodec, TextCodec
from unimodal.diffusion import LossConfig, train_scheduler, training_loss
from unimodal.sampling import SequenceSampler, _Tokens
from unimodal.sequence import Image, PackSpec, Sample, Text, lay_out, pack
from unimodal.visualize import save_image_grid, to_uint8

from .base import SCHEDULERS, Task, check_config

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {}", "the digit {}", "a picture of the number {}", "an image of a handwritten {}",
             "the number {} written by hand")
BOI, EOI = "<boi>", "<eoi>"


def caption_codec(templates: tuple[str, ...] = TEMPLATES) -> TextCodec:
    """Word-level tokenizer over the templates' words and the digit words, plus <unk>, <|endoftext|>,
    <boi> and <eoi>. The same templates always give the same ids."""
    words = sorted({w for tpl in templates for w in tpl.split() if w != "{}"} | set(DIGITS))
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextCodec(tok, [EOT, BOI, EOI])


@dataclass
class MixedCaptionConfig:
    image_size: int = 32  # MNIST zero-padded from 28
    block: int = 16  # patches per image block (a square number, or the whole image)
    templates: tuple[str, ...] = TEMPLATES  # caption templates; "{}" is the digit word
    caption_to_image: float = 0.5  # probability of the caption -> image format (else image -> caption)
    text_weight: float = 1.0
    image_weight: float = 1.0
    sample_steps: int = 25
    scheduler: str = "dpm"
    eval_samples: int = 200  # caption -> image samples, and as many real images to caption
    eval_batch: int = 100
    max_caption: int = 12  # tokens decoded per caption at most

    def __post_init__(self) -> None:
        check_config(self, ("image_size", "block", "sample_steps", "eval_samples", "eval_batch", "max_caption"),
                     ("caption_to_image", "text_weight", "image_weight"), {"scheduler": SCHEDULERS})


def feed_image(s: SequenceSampler, latents: torch.Tensor, block) -> None:
    """Append the clean blocks of given images (B, C, H, W) to the sampler's pending tokens, exactly
    as the sampler leaves a finished block: they are committed by the next pass."""
    if latents.shape[0] != s.B:
        raise ValueError(f"feed_image: {latents.shape[0]} images for a sampler of {s.B} rows")
    lays = [lay_out(Image(z.cpu().float(), block=block), s.spec, s.run, s.unit, single=s.unit == 0) for z in latents]
    lay = lays[0]
    values = torch.stack([x.values for x in lays], 1)  # (nb, B, bs, P)
    nb, _, bs, _ = values.shape
    for b in range(nb):
        s.pending.append(_Tokens(torch.zeros(s.B, bs, dtype=torch.long), values[b], torch.zeros(bs, dtype=torch.bool),
                                 lay.steps[b].expand(bs), lay.pos[b]))
    s.run, s.unit = lay.run, lay.step


class MixedCaptionTask(Task):
    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        t = self.tc = cfg.task
        if not t.templates or any(tpl.count("{}") != 1 for tpl in t.templates):
            raise ValueError(f"task.templates must be non-empty, each with exactly one '{{}}': {t.templates}")
        if cfg.model.num_classes:
            raise ValueError("the caption task has no class labels (text is the conditioning): set model.num_classes=0")
        self.codec = caption_codec(tuple(t.templates))
        self.eot, self.boi, self.eoi = (self.codec.token_id(s) for s in (EOT, BOI, EOI))
        self.digit_ids = torch.tensor([self.codec.token_id(w) for w in DIGITS])
        self.image_codec = PixelCodec(channels=cfg.model.latent_channels)
        self.spec = PackSpec(patch_size=cfg.model.patch_size, latent_channels=cfg.model.latent_channels)
        self.scheduler = train_scheduler()
        self.loss_cfg = LossConfig(text_weight=t.text_weight, image_weight=t.image_weight, class_dropout=0.0)
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def model_config(self):
        m = self.cfg.model
        V = self.codec.vocab_size
        if m.vocab_size == 0:
            return dataclasses.replace(m, vocab_size=V)
        if m.vocab_size < V:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the caption vocabulary ({V} tokens)")
        return m

    # -------------------------------------------------------------- data
    def mnist(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._data:
            x, y = D.mnist_arrays(split)
            x = D._pad(x, self.tc.image_size) if self.tc.image_size != 28 else x
            self._data[split] = (torch.from_numpy(x), torch.from_numpy(y))
        return self._data[split]

    def dataset_size(self) -> int:
        return len(self.mnist("train")[0])

    def caption(self, digit: int, template: int) -> list[int]:
        return self.codec.encode(self.tc.templates[template].format(DIGITS[digit]))

    def sample(self, latent: torch.Tensor, digit: int, g: torch.Generator) -> Sample:
        """One training sample in one of the two formats, chosen with its caption from `g`."""
        t = self.tc
        to_image = bool(torch.rand((), generator=g) < t.caption_to_image)
        cap = self.caption(digit, int(torch.randint(len(t.templates), (), generator=g)))
        img = Image(latent, block=t.block)
        if to_image:
            segs = [Text(torch.tensor(cap + [self.boi])), img, Text(torch.tensor([self.eoi]))]
        else:
            segs = [Text(torch.tensor([self.boi])), img, Text(torch.tensor([self.eoi] + cap + [self.eot]))]
        return Sample(segs, label=None)

    @torch.no_grad()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.image_codec.encode(D.image_batch(images_u8)).float()  # (N, C, H, W)

    def batch(self, step: int):
        idx, pos = self.indices(step)
        x, y = self.mnist("train")
        lat = self.encode(x[idx])  # (N, C, H, W)
        gens = self.generators(step, pos)
        samples = [self.sample(lat[i], int(y[idx[i]]), g) for i, g in enumerate(gens)]
        return pack(samples, self.spec).to(self.device), gens

    def loss(self, model, batch):
        packed, gens = batch
        return training_loss(model, packed, self.scheduler, self.loss_cfg, gens)

    # -------------------------------------------------------------- sampling
    def _sampler(self, model, rows: int, seed: int) -> SequenceSampler:
        H = W = self.tc.image_size
        p = self.spec.patch_size
        return SequenceSampler(model, self.spec, rows, None, 1.0, self.tc.scheduler, self.tc.sample_steps,
                               max_len=(H // p) * (W // p) + 2 * self.tc.max_caption + 8,
                               generator=torch.Generator().manual_seed(seed), precision=self.cfg.precision)

    @torch.no_grad()
    def caption_to_image(self, model, digits: torch.Tensor, template: int, seed: int = 0) -> torch.Tensor:
        """digits (N,) -> images (N, C, H, W) in [-1, 1] generated from "template(digit) <boi>"."""
        s = self._sampler(model, digits.shape[0], seed)
        prompt = torch.tensor([self.caption(int(d), template) + [self.boi] for d in digits])  # (N, n)
        s.feed_text(prompt)
        C, S = self.cfg.model.latent_channels, self.tc.image_size
        return self.image_codec.decode(s.image(C, S, S, block=self.tc.block).float())

    @torch.no_grad()
    def image_to_caption(self, model, images_u8: torch.Tensor, seed: int = 0) -> list[str]:
        """uint8 (N, H, W) real images -> greedy captions (text between <eoi> and <|endoftext|>)."""
        s = self._sampler(model, images_u8.shape[0], seed)
        s.feed_text(torch.tensor([self.boi]))
        feed_image(s, self.encode(images_u8), self.tc.block)
        s.feed_text(torch.tensor([self.eoi]))
        out = s.text(self.tc.max_caption, temperature=0.0, stop=[self.eot])  # (N, n)
        caps = []
        for row in out.tolist():
            row = row[:row.index(self.eot)] if self.eot in row else row
            caps.append(self.codec.decode(row, skip_special_tokens=False))
        return caps

    def preview(self, model, out_dir: Path, step: int) -> list[Path]:
        imgs = self.caption_to_image(model, torch.arange(10), 0, seed=step)
        return [save_image_grid(imgs, Path(out_dir) / f"caption_to_image_step{step:07d}.png", nrow=10, scale=2)]

    # -------------------------------------------------------------- evaluation
    def evaluate(self, model, out_dir: Path, quick: bool = False) -> dict:
        from unimodal import mnist_net

        t = self.tc
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n = min(t.eval_samples, 100) if quick else t.eval_samples
        o = (t.image_size - 28) // 2
        # caption -> image: a balanced set of digits, one template per batch (rows share the prompt length)
        digits = torch.arange(n) % 10
        imgs, captions = [], []
        for i, chunk in enumerate(digits.split(t.eval_batch)):
            tpl = i % len(t.templates)
            imgs.append(self.caption_to_image(model, chunk, tpl, seed=1000 + i).cpu())
            captions += [t.templates[tpl].format(DIGITS[int(d)]) for d in chunk]
        imgs = torch.cat(imgs)  # (n, C, H, W)
        u8 = to_uint8(imgs)[:, 0, o:o + 28, o:o + 28]  # (n, 28, 28)
        pred = mnist_net.classify(u8).argmax(-1)
        shown = min(n, 100)
        save_image_grid(imgs[:shown], out_dir / "caption_to_image.png", nrow=10, scale=3)
        (out_dir / "caption_to_image.txt").write_text("".join(
            f"row {i // 10} col {i % 10}: {captions[i]} -> classified {int(pred[i])}\n" for i in range(shown)))
        metrics: dict = {"samples": n, "caption_to_image_accuracy": float((pred == digits).float().mean())}
        # image -> caption on real test images
        x, y = self.mnist("test")
        x, y = x[:n], y[:n]
        caps = [c for i, chunk in enumerate(x.split(t.eval_batch))
                for c in self.image_to_caption(model, chunk, seed=2000 + i)]
        said = [next((d for d, w in enumerate(DIGITS) if w in c.split()), -1) for c in caps]
        well_formed = {tpl.format(w) for tpl in t.templates for w in DIGITS}
        metrics["image_to_caption_accuracy"] = float(np.mean(np.array(said) == y.numpy()))
        metrics["caption_well_formed"] = float(np.mean([c in well_formed for c in caps]))
        (out_dir / "image_to_caption.txt").write_text("".join(
            f"test image {i} (digit {int(y[i])}): {c}\n" for i, c in enumerate(caps)))
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
