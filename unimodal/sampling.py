"""Samplers over one sequence and one KV cache: text tokens, image blocks and video blocks.

`SequenceSampler` generates a batch of sequences segment by segment. Each forward pass carries
the pending clean tokens (a finished block's result, fed or sampled text) in front of the new
work (a noised block's solver step, or nothing for text): the clean tokens are committed to
the cache in that same pass, so a finished block costs no extra pass. With class-label
guidance the conditional and unconditional streams share the cache; only noised tokens are
doubled. `mode="recompute"` runs every pass as one full forward of the sequence so far under
the training mask instead (the cache's oracle, and the baseline of bench/sampling.py).

    s = SequenceSampler(model, spec, batch=4, labels=y, cfg_scale=1.5)
    latents = s.image(C, H, W, block=64)              # (4, C, H, W)
    for b, x0 in s.stream_image(C, H, W, block=64): ...  # each block as soon as it exists
    s.feed_text(ids); tokens = s.text(max_new=50, temperature=0.8, top_p=0.9, stop=[eot])
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from .config import resolve_precision
from .diffusion import sampling_scheduler
from .kv_cache import KVCache
from .masks import Layout
from .model import ACDiT, ModelInput
from .sequence import Image, PackSpec, Text, Video, lay_out, unpatchify_image, unpatchify_video


@dataclass
class _Tokens:
    """A run of clean tokens shared by all rows: values per row, structure per token."""
    ids: Tensor  # (B, n) text ids (0 at block tokens)
    patches: Tensor  # (B, n, P)
    is_text: Tensor  # (n,) bool
    step: Tensor  # (n,)
    pos: Tensor  # (n, A)


def bf16_linear_weights(model: ACDiT) -> dict[str, Tensor]:
    """The model's parameters with those of its linear layers cast to bf16 once, for passes under bf16
    autocast: autocast would cast exactly these on every pass (and the results are the same), while the
    embeddings and norms stay in fp32, and so does the patch embedding, whose dtype is the residual
    stream's: what the model computes is what bf16 training computes with its fp32 master weights."""
    cast = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and m is not model.x_embedder for p, _ in m.named_parameters(recurse=False)}
    return {n: t.detach().to(torch.bfloat16) if n in cast else t.detach() for n, t in model.named_parameters()}


def row_generators(seed: int, n: int, first: int = 0) -> list[torch.Generator]:
    """One CPU generator for each of the samples first, ..., first + n - 1 of a set drawn with this seed: a
    sample's noise depends on the seed and its index only, not on how the set is cut into batches."""
    if first < 0:
        raise ValueError(f"row_generators: first must be >= 0, got {first}")
    return [torch.Generator().manual_seed(_row_seed(seed, first + i)) for i in range(n)]


def _row_seed(seed: int, index: int) -> int:
    """A 32-bit hash of (seed, index): a CPU generator's Mersenne Twister keeps only a seed's low 32 bits."""
    return int.from_bytes(hashlib.blake2b(repr((seed, index)).encode(), digest_size=4).digest(), "little")


def _noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]) -> Tensor:
    """Standard normal noise of this shape from one generator, or from one per leading row (a list)."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])  # (B, ...)
    return torch.randn(shape, generator=generator)


class SequenceSampler:
    def __init__(self, model: ACDiT, spec: PackSpec, batch: int, labels: Tensor | None = None,
                 cfg_scale: float = 1.0, scheduler: str = "dpm", steps: int = 25, max_len: int = 4096,
                 generator: torch.Generator | list[torch.Generator] | None = None, mode: str = "cache",
                 shared_cache: bool = True, on_pass=None, precision: str = "fp32"):
        """generator: one for the batch, or one per row (`row_generators`): then row i's noise and sampled
        tokens come from generator i alone, so a row's sample does not depend on the batch it is drawn in."""
        if mode not in ("cache", "recompute"):
            raise ValueError(f"mode must be 'cache' or 'recompute', got {mode!r}")
        self.model, self.spec, self.B = model, spec, batch
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.P = model.cfg.patch_dim
        null = model.null_class
        y = torch.full((batch,), null, dtype=torch.long) if labels is None else labels.long().cpu()
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(y.shape)}")
        self.guided = cfg_scale != 1.0
        if self.guided and model.cfg.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes > 0)")
        self.S = 2 if self.guided else 1
        self.y = (torch.cat([y, torch.full_like(y, null)]) if self.guided else y).to(self.device)  # (S*B,)
        self.cfg_scale = cfg_scale
        self.scheduler_kind, self.steps = scheduler, steps
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if isinstance(self.generator, tuple):
            self.generator = list(self.generator)
        if isinstance(self.generator, list) and len(self.generator) != batch:
            raise ValueError(f"{len(self.generator)} generators for a batch of {batch}: give one, or one per row")
        self.mode = mode
        precision = resolve_precision(precision, self.device)  # "auto": bf16 where the device computes it natively
        rows = batch if shared_cache else self.S * batch
        # under bf16 autocast the projections, hence the cached post-RoPE K/V, are bf16
        kv_dtype = torch.bfloat16 if precision == "bf16" else None
        self.cache = KVCache.for_model(model, rows, max_len, dtype=kv_dtype) if mode == "cache" else None
        self.shared_cache = shared_cache
        self.on_pass = on_pass  # callback(inp, n_commit, out) after every pass (tests, profiling)
        # bf16 autocast for the network, as in training; the solver's arithmetic and the guidance stay in fp32.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.weights = None if precision != "bf16" else bf16_linear_weights(model)
        self.run = 0  # running position index
        self.unit = 0  # next autoregressive unit
        self.pending: list[_Tokens] = []
        self.history: list[_Tokens] = []  # committed clean tokens, in order
        self.passes = 0

    # ------------------------------------------------------------------ one forward pass
    def _stack(self, runs: list[_Tokens]) -> _Tokens | None:
        if not runs:
            return None
        return _Tokens(*(torch.cat([getattr(r, f) for r in runs], dim=1 if f in ("ids", "patches") else 0)
                         for f in ("ids", "patches", "is_text", "step", "pos")))

    @torch.no_grad()
    def _pass(self, noisy: Tensor | None = None, noisy_step: int = 0, noisy_pos: Tensor | None = None,
              t: float = 0.0, want_logits: bool = False):
        """Run pending clean tokens (+ an optional noised block (S*B, n, P)) through the model.
        Returns (eps (S*B, n, P) or None, logits at the last clean token (B, V) or None).

        With a shared cache the guidance streams share the row as well: a row holds the pending
        clean tokens once, then the S noised copies of the block (noisy = 1..S, each seeing the
        clean past and itself). Otherwise (recompute, separate caches) stream s is rows s*B.."""
        clean = self._stack(self.pending)
        S, B = self.S, self.B
        along = self.mode == "cache" and self.shared_cache  # streams along the sequence
        rows = B if along else S * B
        rep = 1 if along else S
        parts_ids, parts_patch, is_text, step, noisy_flag, pos = [], [], [], [], [], []
        nc = 0 if clean is None else clean.step.numel()
        if clean is not None:
            parts_ids.append(clean.ids.repeat(rep, 1))  # (rows, nc)
            parts_patch.append(clean.patches.repeat(rep, 1, 1))  # (rows, nc, P)
            is_text.append(clean.is_text)
            step.append(clean.step)
            noisy_flag.append(torch.zeros(nc, dtype=torch.long))
            pos.append(clean.pos)
        nn_ = 0  # noised tokens per stream
        copies = S if along else 1  # noised copies per row
        if noisy is not None:
            nn_ = noisy.shape[1]
            noisy = noisy.cpu()
            if along:
                noisy = noisy.view(S, B, nn_, -1).transpose(0, 1).reshape(B, S * nn_, -1)  # (B, S*n, P)
            parts_ids.append(torch.zeros(rows, copies * nn_, dtype=torch.long))
            parts_patch.append(noisy)
            is_text.append(torch.zeros(copies * nn_, dtype=torch.bool))
            step.append(torch.full((copies * nn_,), noisy_step, dtype=torch.long))
            noisy_flag.append(torch.arange(1, copies + 1).repeat_interleave(nn_))
            pos.append(noisy_pos.repeat(copies, 1))
        if nc + nn_ == 0:
            raise RuntimeError("nothing to run: no pending clean tokens and no noised block")
        ids = torch.cat(parts_ids, 1)  # (rows, n)
        patches = torch.cat(parts_patch, 1).to(self.dtype)  # (rows, n, P)
        is_text_ = torch.cat(is_text)[None].expand(rows, -1)  # (rows, n)
        step_ = torch.cat(step)[None].expand(rows, -1)  # (rows, n)
        noisy_ = torch.cat(noisy_flag)[None].expand(rows, -1)  # (rows, n)
        pos_ = torch.cat(pos)[None].expand(rows, -1, -1)  # (rows, n, A)
        # conditioning row of a noised token: stream (copy - 1) of its row's sample
        cond_index = torch.where(noisy_ > 0, (noisy_ - 1) * B + torch.arange(rows)[:, None], -1)  # (rows, n)
        if self.mode == "recompute":
            hist = self._stack(self.history)
            if hist is not None:
                nh = hist.step.numel()
                ids = torch.cat([hist.ids.repeat(S, 1), ids], 1)
                patches = torch.cat([hist.patches.repeat(S, 1, 1).to(self.dtype), patches], 1)
                is_text_ = torch.cat([hist.is_text[None].expand(rows, -1), is_text_], 1)
                step_ = torch.cat([hist.step[None].expand(rows, -1), step_], 1)
                noisy_ = torch.cat([torch.zeros(rows, nh, dtype=torch.long), noisy_], 1)
                pos_ = torch.cat([hist.pos[None].expand(rows, -1, -1), pos_], 1)
                cond_index = torch.cat([torch.full((rows, nh), -1, dtype=torch.long), cond_index], 1)
        n_all = ids.shape[1]
        layout = Layout(torch.zeros(rows, n_all, dtype=torch.long), step_.contiguous(), noisy_.contiguous())
        dev = self.device
        inp = ModelInput(ids.to(dev), patches.to(dev), is_text_.to(dev), Layout(*(x.to(dev) for x in (
            layout.doc, layout.step, layout.noisy))), pos_.to(dev), cond_index.to(dev),
            torch.full((S * B,), float(t), device=dev), self.y)
        logits_at = None
        if want_logits:
            if clean is None or not bool(clean.is_text[-1]):
                raise RuntimeError("text logits need a pending text token")
            logits_at = torch.zeros(rows, n_all, dtype=torch.bool)
            logits_at[:B, n_all - copies * nn_ - 1] = True
            logits_at = logits_at.to(dev)
        kw = {"logits_at": logits_at}
        if self.mode == "cache":
            kw.update(cache=self.cache, n_commit=nc)
        with self.autocast:
            out = self.model(inp, **kw) if self.weights is None else functional_call(self.model, self.weights, (inp,), kw)
        self.passes += 1
        if self.on_pass is not None:
            self.on_pass(self, inp, nc, out)
        self.history.extend(self.pending)
        self.pending = []
        eps = None
        if nn_:
            eps = out.eps[:, n_all - copies * nn_:]  # (rows, copies*n, P)
            if along:
                eps = eps.reshape(B, S, nn_, -1).transpose(0, 1).reshape(S * B, nn_, -1)  # (S*B, n, P)
        return eps, out.logits

    # ------------------------------------------------------------------ blocks
    def _blocks(self, seg) -> Iterator[tuple[int, Tensor]]:
        lay = lay_out(seg, self.spec, self.run, self.unit, single=self.unit == 0)
        self.run, self.unit = lay.run, lay.step
        nb, bs, P = lay.values.shape
        sched = sampling_scheduler(self.scheduler_kind)
        for b in range(nb):
            x = _noise((self.B, bs, P), self.generator).to(self.device, torch.float32)  # (B, bs, P)
            sched.set_timesteps(self.steps)
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)  # (B, bs, P)
                eps, _ = self._pass(xin.repeat(self.S, 1, 1), int(lay.steps[b]), lay.pos[b], float(t))
                eps = eps.float()  # (S*B, bs, P)
                if self.guided:
                    cond, uncond = eps.chunk(2)
                    eps = uncond + self.cfg_scale * (cond - uncond)  # (B, bs, P)
                x = sched.step(eps, t, x, generator=self.generator).prev_sample  # (B, bs, P)
            self.pending.append(_Tokens(torch.zeros(self.B, bs, dtype=torch.long), x.cpu(),
                                        torch.zeros(bs, dtype=torch.bool), lay.steps[b].expand(bs), lay.pos[b]))
            yield b, x
        self._last_layout = lay

    def stream_image(self, channels: int, height: int, width: int, block=None) -> Iterator[tuple[int, Tensor]]:
        """Yields (block index, (B, bs, P) clean block) as each block finishes."""
        yield from self._blocks(Image(torch.zeros(channels, height, width), block=block))

    def stream_video(self, frames: int, channels: int, height: int, width: int,
                     frames_per_block: int = 1) -> Iterator[tuple[int, Tensor]]:
        yield from self._blocks(Video(torch.zeros(frames, channels, height, width), frames_per_block))

    def image(self, channels: int, height: int, width: int, block=None) -> Tensor:
        """Generate one image per row: (B, C, H, W) latents."""
        blocks = [x for _, x in self.stream_image(channels, height, width, block)]
        Hp, Wp, kh, kw = self._last_layout.grid
        toks = torch.cat(blocks, 1)  # (B, n, P)
        return torch.stack([unpatchify_image(toks[i], self.spec.patch_size, Hp, Wp, kh, kw) for i in range(self.B)])

    def video(self, frames: int, channels: int, height: int, width: int, frames_per_block: int = 1) -> Tensor:
        """Generate one video per row: (B, T, C, H, W) latents; T may exceed the training length."""
        blocks = [x for _, x in self.stream_video(frames, channels, height, width, frames_per_block)]
        T, Hp, Wp, _ = self._last_layout.grid
        toks = torch.cat(blocks, 1)  # (B, n, P)
        return torch.stack([unpatchify_video(toks[i], self.spec.patch_size, T, Hp, Wp) for i in range(self.B)])

    def feed_image(self, latents: Tensor, block=None) -> None:
        """Append given images (B, C, H, W) as clean blocks, exactly as the sampler leaves a finished
        block (committed by the next pass): to caption or continue a real image."""
        if latents.shape[0] != self.B:
            raise ValueError(f"feed_image: {latents.shape[0]} images for a sampler of {self.B} rows")
        lays = [lay_out(Image(z.cpu().float(), block=block), self.spec, self.run, self.unit, single=self.unit == 0)
                for z in latents]
        lay = lays[0]
        values = torch.stack([x.values for x in lays], 1)  # (nb, B, bs, P)
        nb, _, bs, _ = values.shape
        for b in range(nb):
            self.pending.append(_Tokens(torch.zeros(self.B, bs, dtype=torch.long), values[b],
                                        torch.zeros(bs, dtype=torch.bool), lay.steps[b].expand(bs), lay.pos[b]))
        self.run, self.unit = lay.run, lay.step

    # ------------------------------------------------------------------ text
    def feed_text(self, ids: Tensor) -> None:
        """Append given text tokens (B, n) (a prompt, markers); they are committed by the next pass."""
        ids = ids.long().cpu()
        if ids.dim() == 1:
            ids = ids[None].expand(self.B, -1)
        lay = lay_out(Text(ids[0]), self.spec, self.run, self.unit, single=self.unit == 0)
        self.run, self.unit = lay.run, lay.step
        n = ids.shape[1]
        self.pending.append(_Tokens(ids, torch.zeros(self.B, n, self.P), torch.ones(n, dtype=torch.bool),
                                    lay.steps, lay.pos))

    def stream_text(self, max_new: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    stop: list[int] | None = None) -> Iterator[Tensor]:
        """Yields (B,) next tokens; temperature 0 is greedy. A row that emitted a stop token produces
        stop[0] from then on; the stream ends when every row has stopped or after max_new tokens."""
        procs = LogitsProcessorList()
        if temperature > 0 and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        stop_t = torch.tensor(stop or [], dtype=torch.long)
        done = torch.zeros(self.B, dtype=torch.bool)
        for _ in range(max_new):
            _, logits = self._pass(want_logits=True)
            logits = logits.float().cpu()  # (B, V)
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                probs = procs(None, logits).softmax(-1)
                if isinstance(self.generator, list):  # (B,): row i drawn from generator i
                    tok = torch.cat([torch.multinomial(p[None], 1, generator=g)[0]
                                     for p, g in zip(probs, self.generator)])
                else:
                    tok = torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # (B,)
            if stop_t.numel():
                tok = torch.where(done, stop_t[0], tok)
                done |= torch.isin(tok, stop_t)
            self.feed_text(tok[:, None])
            yield tok
            if stop_t.numel() and bool(done.all()):
                break

    def text(self, max_new: int, **kw) -> Tensor:
        toks = list(self.stream_text(max_new, **kw))
        return torch.stack(toks, 1) if toks else torch.zeros(self.B, 0, dtype=torch.long)


def sample_images(model: ACDiT, spec: PackSpec, labels: Tensor, latent_shape: tuple[int, int, int], block=None,
                  cfg_scale: float = 1.0, steps: int = 25, scheduler: str = "dpm",
                  generator: torch.Generator | list[torch.Generator] | None = None, mode: str = "cache",
                  precision: str = "fp32") -> Tensor:
    """Class-conditional images: labels (B,) -> latents (B, C, H, W); precision as SequenceSampler's."""
    C, H, W = latent_shape
    n = (H // spec.patch_size) * (W // spec.patch_size)
    s = SequenceSampler(model, spec, labels.shape[0], labels, cfg_scale, scheduler, steps, max_len=n + 16,
                        generator=generator, mode=mode, precision=precision)
    return s.image(C, H, W, block)


def sample_videos(model: ACDiT, spec: PackSpec, labels: Tensor, latent_shape: tuple[int, int, int, int],
                  frames_per_block: int = 1, cfg_scale: float = 1.0, steps: int = 25, scheduler: str = "dpm",
                  generator: torch.Generator | list[torch.Generator] | None = None, mode: str = "cache",
                  precision: str = "fp32") -> Tensor:
    """Class-conditional videos: labels (B,) -> latents (B, T, C, H, W); precision as SequenceSampler's."""
    T, C, H, W = latent_shape
    n = T * (H // spec.patch_size) * (W // spec.patch_size)
    s = SequenceSampler(model, spec, labels.shape[0], labels, cfg_scale, scheduler, steps, max_len=n + 16,
                        generator=generator, mode=mode, precision=precision)
    return s.video(T, C, H, W, frames_per_block)
