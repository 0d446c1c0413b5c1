"""Codecs: what the model sees instead of raw data.

Continuous codecs share one interface:
    encode(x)        x float in [-1, 1], (N,C,H,W) or (N,T,C,H,W) -> latents (N,c,h,w) or (N,T,c,h,w)
    decode(latents)  -> x in [-1, 1], same layout
    latent_channels, downsample (spatial factor), in_channels

- PixelCodec: identity in pixel space (tiny data: MNIST, Moving MNIST).
- VAECodec: a diffusers AutoencoderKL loaded from a local directory, latents scaled as
  (z - shift_factor) * scaling_factor; videos are encoded frame by frame.

Text is discrete: `TextCodec` wraps a HuggingFace `tokenizers.Tokenizer` (the exact GPT-2 BPE
from the offline carrier, or a tokenizer.json trained by tokenizers/train_bpe.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

SD_VAE_HINT = ("To use the Stable Diffusion VAE, download it once on a machine with internet:\n"
               "  python -c \"from diffusers import AutoencoderKL; "
               "AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained('sd-vae-ft-ema')\"\n"
               "then pass the local directory (here: sd-vae-ft-ema). A small MNIST VAE is trained by "
               "tokenizers/train_vae.py.")


class CodecError(ValueError):
    """A codec could not be built or was given input it cannot take."""


def _check_range(x: torch.Tensor, what: str) -> None:
    if not torch.is_floating_point(x):
        raise CodecError(f"{what}: expected a float tensor in [-1, 1], got dtype {x.dtype} "
                         "(convert uint8 pixels with unimodal.data.to_unit)")
    if x.numel() and (x.min() < -1.0001 or x.max() > 1.0001):
        raise CodecError(f"{what}: expected values in [-1, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]")


def _frames(x: torch.Tensor, what: str) -> tuple[torch.Tensor, int | None]:
    """(N,C,H,W) -> itself, None; (N,T,C,H,W) -> (N*T,C,H,W), T."""
    if x.ndim == 4:
        return x, None
    if x.ndim == 5:
        n, t = x.shape[:2]
        return x.reshape(n * t, *x.shape[2:]), t  # (N*T,C,H,W)
    raise CodecError(f"{what}: expected (N,C,H,W) or (N,T,C,H,W), got shape {tuple(x.shape)}")


def _unframes(x: torch.Tensor, t: int | None) -> torch.Tensor:
    return x if t is None else x.reshape(-1, t, *x.shape[1:])  # (N,T,c,h,w)


class PixelCodec:
    """Identity codec: the latents are the pixels in [-1, 1]."""

    downsample = 1

    def __init__(self, channels: int = 1):
        self.in_channels = self.latent_channels = channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_range(x, "PixelCodec.encode")
        frames, _ = _frames(x, "PixelCodec.encode")
        if frames.shape[1] != self.in_channels:
            raise CodecError(f"PixelCodec.encode: expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        return x.clone()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        _frames(z, "PixelCodec.decode")
        return z.clamp(-1, 1)

    def __repr__(self) -> str:
        return f"PixelCodec(channels={self.in_channels})"


def _vae_dir(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Validate a local diffusers VAE directory; returns (dir, subfolder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CodecError(f"VAE directory {p} does not exist.\n{SD_VAE_HINT}")
    if not p.is_dir():
        raise CodecError(f"VAE path {p} is a file; expected a diffusers directory "
                         f"(config.json + diffusion_pytorch_model.safetensors).\n{SD_VAE_HINT}")
    sub = None
    if not (p / "config.json").exists() and (p / "vae" / "config.json").exists():
        sub = "vae"  # a whole Stable Diffusion pipeline folder
    cfg_path = p / (sub or "") / "config.json"
    if not cfg_path.exists():
        raise CodecError(f"{p} has no config.json: not a diffusers AutoencoderKL directory.\n{SD_VAE_HINT}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CodecError(f"{cfg_path} is not valid JSON ({e}); expected a diffusers AutoencoderKL config") from None
    if cfg.get("_class_name") != "AutoencoderKL":
        raise CodecError(f"{cfg_path} describes {cfg.get('_class_name')!r}, expected 'AutoencoderKL'.\n{SD_VAE_HINT}")
    weights = [f for f in os.listdir(cfg_path.parent) if f.startswith("diffusion_pytorch_model")]
    if not weights:
        raise CodecError(f"{cfg_path.parent} has a config but no diffusion_pytorch_model.safetensors/.bin weights")
    return p, sub


class VAECodec:
    """diffusers AutoencoderKL from a local directory; latents = (z - shift) * scale.

    `sample=False` uses the posterior mean (deterministic); `sample=True` draws z from the
    posterior with `generator`. Work is split into chunks of `chunk_size` images/frames.
    `allow_download=True` lets `path` be a hub id (for example "stabilityai/sd-vae-ft-ema")
    fetched by diffusers; it is never the default.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sample: bool = False, chunk_size: int = 64,
                 allow_download: bool = False):
        from diffusers import AutoencoderKL

        if allow_download and not Path(path).expanduser().exists():
            self.vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
            self.path = str(path)
        else:
            p, sub = _vae_dir(path)
            try:
                self.vae = AutoencoderKL.from_pretrained(p, subfolder=sub, torch_dtype=dtype)
            except Exception as e:  # diffusers raises many kinds for a broken directory
                raise CodecError(f"could not load an AutoencoderKL from {p}: {type(e).__name__}: {e}\n"
                                 f"{SD_VAE_HINT}") from e
            self.path = str(p)
        self.vae.to(device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.device, self.dtype = torch.device(device), dtype
        self.sample, self.chunk_size = sample, chunk_size
        self.scaling_factor = float(cfg.scaling_factor if cfg.scaling_factor is not None else 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.in_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def fingerprint(self) -> str | None:
        """sha256 of the VAE's config.json and weight files (what a latent cache records of its VAE); None for a
        model fetched from the hub."""
        if getattr(self, "_fingerprint", None) is None and Path(self.path).is_dir():
            d = Path(self.path) / ("vae" if (Path(self.path) / "vae" / "config.json").exists()
                                   and not (Path(self.path) / "config.json").exists() else "")
            h = hashlib.sha256()
            for f in [d / "config.json"] + sorted(d.glob("diffusion_pytorch_model*")):
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._fingerprint = h.hexdigest()
        return getattr(self, "_fingerprint", None)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_range(x, "VAECodec.encode")
        frames, t = _frames(x, "VAECodec.encode")  # (M,C,H,W)
        if frames.shape[1] != self.in_channels:
            raise CodecError(f"VAECodec.encode: the VAE at {self.path} takes {self.in_channels} channels, "
                             f"got shape {tuple(x.shape)}")
        h, w = frames.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise CodecError(f"VAECodec.encode: {h}x{w} is not divisible by the downsampling factor {self.downsample}")
        out = []
        for chunk in frames.split(self.chunk_size):
            post = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            z = post.sample(generator) if self.sample else post.mean  # (m,c,h/f,w/f)
            out.append(((z - self.shift_factor) * self.scaling_factor).float().cpu())
        return _unframes(torch.cat(out), t)  # (N,c,h,w) or (N,T,c,h,w)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        frames, t = _frames(z, "VAECodec.decode")  # (M,c,h,w)
        if frames.shape[1] != self.latent_channels:
            raise CodecError(f"VAECodec.decode: expected {self.latent_channels} latent channels, got {tuple(z.shape)}")
        out = []
        for chunk in frames.split(self.chunk_size):
            chunk = chunk.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
            out.append(self.vae.decode(chunk).sample.float().clamp(-1, 1).cpu())  # (m,C,H,W)
        return _unframes(torch.cat(out), t)

    def __repr__(self) -> str:
        return (f"VAECodec({self.path!r}, latent_channels={self.latent_channels}, downsample={self.downsample}, "
                f"scaling_factor={self.scaling_factor:.5g}, shift_factor={self.shift_factor:.5g})")


def build_codec(name: str = "pixel", **kw):
    """'pixel' -> PixelCodec(channels=...), 'vae' -> VAECodec(path=...)."""
    if name == "pixel":
        return PixelCodec(**kw)
    if name == "vae":
        return VAECodec(**kw)
    raise CodecError(f"unknown codec {name!r}; known: pixel, vae")


# ----------------------------------------------------------------------------- text

EOT = "<|endoftext|>"


def gpt2_tokenizer():
    """The exact GPT-2 BPE (50257 tokens, <|endoftext|> = 50256) from the offline carrier files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from unimodal.assets import asset_path

    tok = Tokenizer(models.BPE.from_file(str(asset_path("gpt2_encoder")), str(asset_path("gpt2_merges"))))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOT])  # already id 50256 in the vocab; marks it unsplittable
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, special_tokens: Sequence[str] = (EOT,),
              min_frequency: int = 2, show_progress: bool = True, length: int | None = None):
    """Train a ByteLevel BPE (GPT-2 style pre-tokenizer) on an iterator of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


class TextCodec:
    """list[int] <-> str through a HuggingFace tokenizer, with extra special tokens.

    Special tokens added with `add_special_tokens` get the next free ids in the order given,
    so the same list gives the same ids every time; adding an existing one keeps its id.
    """

    def __init__(self, tokenizer, specials: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.add_special_tokens(specials)

    @classmethod
    def gpt2(cls, specials: Sequence[str] = ()) -> "TextCodec":
        return cls(gpt2_tokenizer(), specials)

    @classmethod
    def from_file(cls, path: str | os.PathLike, specials: Sequence[str] = ()) -> "TextCodec":
        """A tokenizer.json (e.g. from tokenizers/train_bpe.py) or a directory holding one."""
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.exists():
            raise CodecError(f"tokenizer file {p} does not exist (train one with tokenizers/train_bpe.py)")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise CodecError(f"{p} is not a HuggingFace tokenizer.json: {e}") from None
        return cls(tok, specials)

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        from tokenizers import AddedToken

        new = [t for t in tokens if self.tokenizer.token_to_id(t) is None]
        for t in new:  # one at a time: the id order follows the list order
            self.tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        return {t: self.token_id(t) for t in tokens}

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise CodecError(f"token {token!r} is not in the vocabulary; add it with add_special_tokens")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise CodecError(f"TextCodec.encode: expected str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise CodecError(f"TextCodec.decode: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.decode_batch([list(map(int, b)) for b in batch], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(str(path))

    def __len__(self) -> int:
        return self.vocab_size
