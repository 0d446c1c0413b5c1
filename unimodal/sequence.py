"""Segments -> packed rows, and back.

A sample is a list of segments. Text is discrete (every token an autoregressive unit);
images and videos are continuous latents cut into patches and grouped into blocks (every
block a unit). In a packed row each sample contributes its clean stream (text tokens and
clean blocks, in order) followed by its noised blocks; several samples share a row, the
rest is padding. Every token carries (doc, step, noisy) for the mask and an ND position.

Patch vectors are ordered (p, q, c) as in the reference implementation; image blocks are
sqrt(B) x sqrt(B) squares of patches (raster over blocks, raster inside a block); video
blocks are whole frames (raster over t, h, w).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from .masks import Layout

PAD, TEXT, BLOCK = 0, 1, 2
IGNORE = -100


# ----------------------------------------------------------------------------- segments

@dataclass
class Text:
    tokens: Tensor  # (n,) long
    loss: bool = True  # next-token targets inside this segment


@dataclass
class Image:
    latent: Tensor  # (C, H, W)
    block: int | tuple[int, int] | None = None  # patches per block: k*k, (kh, kw) or None = whole image


@dataclass
class Video:
    latent: Tensor  # (T, C, H, W)
    frames_per_block: int = 1


Segment = Text | Image | Video


@dataclass
class Sample:
    segments: list
    label: int | None = None  # class label; None = the null class


# ----------------------------------------------------------------------------- patchify

def image_block_shape(seg: Image, patch: int) -> tuple[int, int, int, int]:
    """(Hp, Wp, kh, kw) of an image segment; raises on a block that does not tile the grid."""
    C, H, W = seg.latent.shape
    if H % patch or W % patch:
        raise ValueError(f"image latent {tuple(seg.latent.shape)} is not divisible by patch size {patch}")
    Hp, Wp = H // patch, W // patch
    if seg.block is None:
        kh, kw = Hp, Wp
    elif isinstance(seg.block, int):
        if seg.block == Hp * Wp:
            kh, kw = Hp, Wp
        else:
            k = math.isqrt(seg.block)
            if k * k != seg.block:
                raise ValueError(f"image block size {seg.block} is not a square number of patches "
                                 f"(nor the whole {Hp}x{Wp} grid)")
            kh = kw = k
    else:
        kh, kw = seg.block
    if Hp % kh or Wp % kw:
        raise ValueError(f"image block {kh}x{kw} does not tile the {Hp}x{Wp} patch grid")
    return Hp, Wp, kh, kw


def patchify_image(latent: Tensor, patch: int, kh: int, kw: int) -> Tensor:
    """(C, H, W) -> (n_blocks, kh*kw, p*p*C), blocks and patches in raster order."""
    return rearrange(latent, "c (bh kh p) (bw kw q) -> (bh bw) (kh kw) (p q c)", kh=kh, kw=kw, p=patch, q=patch)


def unpatchify_image(tokens: Tensor, patch: int, Hp: int, Wp: int, kh: int, kw: int) -> Tensor:
    """(n_blocks * kh*kw, p*p*C) -> (C, H, W)."""
    return rearrange(tokens, "(bh bw kh kw) (p q c) -> c (bh kh p) (bw kw q)",
                     bh=Hp // kh, bw=Wp // kw, kh=kh, kw=kw, p=patch, q=patch)


def patchify_video(latent: Tensor, patch: int, frames_per_block: int) -> Tensor:
    """(T, C, H, W) -> (n_blocks, f*Hp*Wp, p*p*C)."""
    return rearrange(latent, "(n f) c (h p) (w q) -> n (f h w) (p q c)", f=frames_per_block, p=patch, q=patch)


def unpatchify_video(tokens: Tensor, patch: int, T: int, Hp: int, Wp: int) -> Tensor:
    """(T*Hp*Wp, p*p*C) -> (T, C, H, W)."""
    return rearrange(tokens, "(t h w) (p q c) -> t c (h p) (w q)", t=T, h=Hp, w=Wp, p=patch, q=patch)


def _image_positions(Hp: int, Wp: int, kh: int, kw: int) -> Tensor:
    """(Hp*Wp, 2) (h, w) in the token order of patchify_image."""
    h = torch.arange(Hp)[:, None].expand(Hp, Wp)
    w = torch.arange(Wp)[None, :].expand(Hp, Wp)
    hw = torch.stack([h, w], -1)  # (Hp, Wp, 2)
    return rearrange(hw, "(bh kh) (bw kw) a -> (bh bw kh kw) a", kh=kh, kw=kw)


def _video_positions(T: int, Hp: int, Wp: int) -> Tensor:
    """(T*Hp*Wp, 3) (t, h, w) in raster order."""
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hp), torch.arange(Wp), indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)


# ----------------------------------------------------------------------------- packed rows

@dataclass
class SegmentRecord:
    """Where one segment of one sample lives in the packed batch (for unpacking)."""
    sample: int
    kind: str  # "text" | "image" | "video"
    shape: tuple  # latent shape, or (n,) for text
    row: int
    clean_idx: Tensor  # (n_tokens,) positions in the row of the clean copy (-1 where dropped)
    noisy_idx: Tensor | None  # (n_tokens,) positions of the noised copy (blocks only)
    blocks: list[int] = field(default_factory=list)  # global block ids, in order
    grid: tuple = ()  # (Hp, Wp, kh, kw) or (T, Hp, Wp, f)


@dataclass
class Packed:
    tokens: Tensor  # (B, L) long text ids (0 elsewhere)
    patches: Tensor  # (B, L, P) clean patch vectors of both copies of every block (0 elsewhere)
    kind: Tensor  # (B, L) int8: PAD, TEXT, BLOCK
    doc: Tensor  # (B, L) long
    step: Tensor  # (B, L) long
    noisy: Tensor  # (B, L) long 0/1
    pos: Tensor  # (B, L, A) long
    block_id: Tensor  # (B, L) long global block index for block tokens of either copy, -1 elsewhere
    text_target: Tensor  # (B, L) long next-token target, IGNORE where none
    block_label: Tensor  # (n_blocks,) long class label of each block's sample (-1 = none)
    block_sample: Tensor  # (n_blocks,) long index of each block's sample
    records: list[SegmentRecord]
    n_samples: int

    @property
    def layout(self) -> Layout:
        return Layout(self.doc, self.step, self.noisy)

    @property
    def n_blocks(self) -> int:
        return int(self.block_label.shape[0])

    def to(self, device) -> "Packed":
        kw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Packed(**kw)

    def segments_of(self, sample: int) -> list[SegmentRecord]:
        return [r for r in self.records if r.sample == sample]


@dataclass
class PackSpec:
    patch_size: int = 1
    latent_channels: int | None = None  # None: taken from the samples' image / video segments
    positions: str = "mrope"  # "mrope" (3 axes, DESIGN.md section 3) | "reference" (2 axes image / 3 video, no offsets)
    drop_dead_clean: bool = False  # omit clean copies nothing can attend to (the last unit of a sample)


@dataclass
class SegmentLayout:
    """One segment laid out from running position `run` and unit `step` (DESIGN.md section 3)."""
    kind: str  # "text" | "image" | "video"
    shape: tuple
    grid: tuple  # (Hp, Wp, kh, kw) image, (T, Hp, Wp, f) video, () text
    values: Tensor  # (n,) token ids for text; (nb, bs, P) patch vectors per block
    pos: Tensor  # (n, A) text; (nb, bs, A) blocks
    steps: Tensor  # (n,) text: one unit per token; (nb,) blocks: one unit per block
    targets: Tensor | None  # (n,) next-token targets (text)
    run: int  # running position after the segment
    step: int  # next unit after the segment


def lay_out(seg: Segment, spec: PackSpec, run: int = 0, step: int = 0, single: bool = True) -> SegmentLayout:
    """Patchify a segment into tokens/blocks with their positions and units. `single` says the
    segment is its sample's only one (required by positions="reference")."""
    p, mrope = spec.patch_size, spec.positions == "mrope"
    if not mrope and not single:
        raise ValueError("positions='reference' supports single-segment samples only")
    if isinstance(seg, Text):
        ids = seg.tokens.long().flatten()
        n = ids.numel()
        if n == 0:
            raise ValueError("empty text segment")
        pos = (run + torch.arange(n))[:, None].expand(n, 3) if mrope else torch.arange(n)[:, None]
        tgt = torch.full((n,), IGNORE, dtype=torch.long)
        if seg.loss and n > 1:
            tgt[:-1] = ids[1:]
        return SegmentLayout("text", (n,), (), ids, pos, step + torch.arange(n), tgt,
                             run + n if mrope else run, step + n)
    if isinstance(seg, Image):
        Hp, Wp, kh, kw = image_block_shape(seg, p)
        blocks = patchify_image(seg.latent, p, kh, kw)  # (nb, kh*kw, P)
        pos = _image_positions(Hp, Wp, kh, kw).view(blocks.shape[0], kh * kw, 2)  # (nb, bs, 2)
        if mrope:
            pos = torch.cat([torch.zeros_like(pos[..., :1]), pos], -1) + run  # (nb, bs, 3)
        grid, kind, extent = (Hp, Wp, kh, kw), "image", max(Hp, Wp)
    elif isinstance(seg, Video):
        T, C, H, W = seg.latent.shape
        f = seg.frames_per_block
        if T % f:
            raise ValueError(f"video with {T} frames is not divisible into blocks of {f} frames")
        if H % p or W % p:
            raise ValueError(f"video latent {tuple(seg.latent.shape)} is not divisible by patch size {p}")
        Hp, Wp = H // p, W // p
        blocks = patchify_video(seg.latent, p, f)  # (nb, f*Hp*Wp, P)
        pos = _video_positions(T, Hp, Wp).view(blocks.shape[0], f * Hp * Wp, 3) + (run if mrope else 0)
        grid, kind, extent = (T, Hp, Wp, f), "video", max(T, Hp, Wp)
    else:
        raise TypeError(f"unknown segment type {type(seg).__name__}")
    nb = blocks.shape[0]
    return SegmentLayout(kind, tuple(seg.latent.shape), grid, blocks, pos, step + torch.arange(nb), None,
                         run + extent if mrope else run, step + nb)


def _sample_tokens(sample: Sample, spec: PackSpec, sample_idx: int):
    """Lay out one sample: returns the per-token chunks of its clean stream and its noisy stream."""
    clean, noisy = [], []  # lists of dict chunks
    segs = []
    run = step = 0
    for si, seg in enumerate(sample.segments):
        try:
            lay = lay_out(seg, spec, run, step, single=len(sample.segments) == 1)
        except (ValueError, TypeError) as e:
            raise type(e)(f"sample {sample_idx} segment {si}: {e}") from None
        run, step = lay.run, lay.step
        if lay.kind == "text":
            clean.append(dict(kind=TEXT, tokens=lay.values, patches=None, step=lay.steps, pos=lay.pos,
                              tgt=lay.targets, seg=si, block=None))
            segs.append(("text", lay.shape, si))
            continue
        nb, bs, _ = lay.values.shape
        for b in range(nb):
            chunk = dict(kind=BLOCK, tokens=None, patches=lay.values[b], step=lay.steps[b].expand(bs),
                         pos=lay.pos[b], tgt=None, seg=si, block=b)
            clean.append(chunk)
            noisy.append(chunk)
        segs.append((lay.kind, lay.shape, si, lay.grid, nb))
    if spec.drop_dead_clean and clean and clean[-1]["kind"] == BLOCK:
        clean.pop()  # the sample's last unit: no later token attends its clean copy
    return clean, noisy, segs


def pack(samples: list[Sample], spec: PackSpec, max_len: int | None = None) -> Packed:
    """Pack samples into rows. max_len None: one sample per row, padded to the longest.
    Otherwise samples are placed greedily, in order, into rows of exactly max_len tokens."""
    laid = [_sample_tokens(s, spec, i) for i, s in enumerate(samples)]
    lengths = [sum(len(c["step"]) for c in cl) + sum(len(c["step"]) for c in no) for cl, no, _ in laid]
    if max_len is None:
        rows = [[i] for i in range(len(samples))]
        L = max(lengths)
    else:
        rows, cur, used = [], [], 0
        for i, n in enumerate(lengths):
            if n > max_len:
                raise ValueError(f"sample {i} needs {n} tokens (clean + noised copies), more than max_len={max_len}")
            if used + n > max_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        rows.append(cur)
        L = max_len
    P = spec.patch_size ** 2 * _latent_channels(samples, spec.latent_channels)
    A = 3 if spec.positions == "mrope" else max(
        (c["pos"].shape[-1] for cl, no, _ in laid for c in cl + no), default=1)
    B = len(rows)
    tokens = torch.zeros(B, L, dtype=torch.long)
    patches = torch.zeros(B, L, P)
    kind = torch.full((B, L), PAD, dtype=torch.int8)
    doc = torch.full((B, L), -1, dtype=torch.long)
    step = torch.zeros(B, L, dtype=torch.long)
    noisy = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, A, dtype=torch.long)
    block_id = torch.full((B, L), -1, dtype=torch.long)
    tgt = torch.full((B, L), IGNORE, dtype=torch.long)
    block_label: list[int] = []
    block_sample: list[int] = []
    records: list[SegmentRecord] = []
    for r, members in enumerate(rows):
        o = 0
        for d, si in enumerate(members):
            clean, noisy_chunks, segs = laid[si]
            label = samples[si].label
            where: dict = {}  # (seg, block) -> global block id
            seg_clean: dict = {k[2]: [] for k in segs}
            seg_noisy: dict = {k[2]: [] for k in segs}
            for is_noisy, chunks in ((0, clean), (1, noisy_chunks)):
                for c in chunks:
                    n = len(c["step"])
                    sl = slice(o, o + n)
                    kind[r, sl] = c["kind"]
                    doc[r, sl] = d
                    step[r, sl] = c["step"]
                    noisy[r, sl] = is_noisy
                    pos[r, sl, :c["pos"].shape[-1]] = c["pos"]
                    if c["kind"] == TEXT:
                        tokens[r, sl] = c["tokens"]
                        tgt[r, sl] = c["tgt"]
                    else:
                        patches[r, sl] = c["patches"]
                        key = (c["seg"], c["block"])
                        if key not in where:
                            where[key] = len(block_label)
                            block_label.append(-1 if label is None else int(label))
                            block_sample.append(si)
                        block_id[r, sl] = where[key]
                    (seg_noisy if is_noisy else seg_clean)[c["seg"]].append((c["block"], torch.arange(o, o + n)))
                    o += n
            for sg in segs:
                k, shape, si_seg = sg[0], sg[1], sg[2]
                cl = seg_clean[si_seg]
                if k == "text":
                    records.append(SegmentRecord(si, k, shape, r, torch.cat([ix for _, ix in cl]), None))
                    continue
                grid, nb = sg[3], sg[4]
                bsz = len(seg_noisy[si_seg][0][1])
                clean_idx = torch.full((nb * bsz,), -1, dtype=torch.long)
                for b, ix in cl:
                    clean_idx[b * bsz:(b + 1) * bsz] = ix
                noisy_idx = torch.cat([ix for _, ix in seg_noisy[si_seg]])
                records.append(SegmentRecord(si, k, shape, r, clean_idx, noisy_idx,
                                             [where[(si_seg, b)] for b in range(nb)], grid))
    return Packed(tokens, patches, kind, doc, step, noisy, pos, block_id, tgt,
                  torch.tensor(block_label, dtype=torch.long), torch.tensor(block_sample, dtype=torch.long),
                  records, len(samples))


def _latent_channels(samples: list[Sample], expected: int | None) -> int:
    chans = {s.latent.shape[-3] for smp in samples for s in smp.segments if isinstance(s, (Image, Video))}
    if expected is not None:
        chans.add(expected)
    if len(chans) > 1:
        raise ValueError(f"all image/video segments must have {expected or 'one'} latent channels, got {sorted(chans)}")
    return chans.pop() if chans else 1


def unpack_latents(packed: Packed, values: Tensor, spec: PackSpec, copy: str = "noisy") -> list[list[Tensor]]:
    """Per-token outputs (B, L, P) -> for every sample, its image/video segments' latents, in order.
    copy: which copy's positions to read ("noisy" for model predictions, "clean" for the inputs)."""
    out: list[list[Tensor]] = [[] for _ in range(packed.n_samples)]
    for rec in packed.records:
        if rec.kind == "text":
            continue
        idx = rec.noisy_idx if copy == "noisy" else rec.clean_idx
        if (idx < 0).any():
            raise ValueError(f"sample {rec.sample}: the clean copy of a block was dropped from the packing")
        tok = values[rec.row, idx]  # (n_tokens, P)
        if rec.kind == "image":
            Hp, Wp, kh, kw = rec.grid
            out[rec.sample].append(unpatchify_image(tok, spec.patch_size, Hp, Wp, kh, kw))
        else:
            T, Hp, Wp, _ = rec.grid
            out[rec.sample].append(unpatchify_video(tok, spec.patch_size, T, Hp, Wp))
    return out
