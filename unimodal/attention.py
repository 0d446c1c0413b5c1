"""Attention: RoPE-ND, QK-norm, and the one backend dispatch.

Backends (all derive their masks from `masks.allowed`):
  "sdpa"   scaled_dot_product_attention with the dense (B, 1, L, L) boolean mask
  "block"  block-structured CPU path: per query group, attention over exactly the keys it can see
           (SCAM's empty part is never computed): the own fused kernel (`block_kernel`, AVX-512 /
           AVX512-BF16, or AVX2) for groups that see their keys fully, one ATen fused SDPA call per group otherwise
  "flex"   FlexAttention with a BlockMask (compiled on CUDA; eager elsewhere, forward only on CPU)
  "flash"  cached passes on CUDA (optional extra): flash_attn_with_kvcache over the committed cache,
           flash_attn_func over the pass's own tokens by query group, merged by log-sum-exp
           (fp16/bf16; any other case of a cached pass goes through SDPA)
"auto" picks flex on CUDA; on CPU block, or sdpa when the rows of the batch differ (one block call per
row was measured slower than one dense SDPA call: 0.55 vs 0.36 s per step of the mixed tiny config) or
a row has more than MAX_BLOCK_GROUPS groups for ATen's kernels; flash for cached passes on CUDA where
flash-attn is installed. A requested backend that cannot run a pass (flex training on CPU: no
backward there; flash without CUDA and flash-attn; block or flex for a cached pass on CUDA) is
replaced by what "auto" picks, with a warning once per case; flash serves cached passes only, and
leaves the other passes to "auto" without a warning.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import block_kernel, masks
from .config import ATTN_BACKENDS, rope_base
from .masks import Layout

BACKENDS = ATTN_BACKENDS
# above this many query groups per row that ATen's kernels take (a call each; the own kernel takes the rest
# in one call) the block path falls back to dense SDPA
MAX_BLOCK_GROUPS = 96
# The CPU backward kernel in bf16 beats the fp32 one (1.1-1.3x) from about 128 queries per call and
# loses below (0.5x at 16): smaller groups of a bf16 block path take the fp32 kernel (measured here).
LOW_BWD_MIN_QUERIES = 128
# The own kernel's forward keeps the attention probabilities of the allowed pairs (2 bytes each in bf16)
# for its backward, which then skips Q K^T and the exponentials (about 15% faster here), as long as the
# probabilities held for the backward stay under this many MiB in all; past it, or with
# UNIMODAL_KEEP_PROBS_MIB=0, the backward recomputes them (FlashAttention's memory).
KEEP_PROBS_MIB = int(os.environ.get("UNIMODAL_KEEP_PROBS_MIB", "2048"))
_POOL: dict = {}  # (numel, dtype) -> buffers, held by a graph or free (fresh memory costs page faults)


def _probs_buffer(n: int, dtype: torch.dtype) -> Tensor | None:
    """A buffer for n probabilities, reused once the autograd graph that held it is freed; None when
    keeping them would pass KEEP_PROBS_MIB held by live graphs."""
    need, limit = n * torch.finfo(dtype).bits // 8, KEEP_PROBS_MIB * 2 ** 20
    held = pooled = 0
    free = None
    for key, bufs in _POOL.items():
        for buf in bufs:
            pooled += buf.nbytes
            if sys.getrefcount(buf) > 3:  # more than the list, `buf` and getrefcount's argument: held
                held += buf.nbytes
            elif free is None and key == (n, dtype):
                free = buf
    if held + need > limit:
        return None
    if free is not None:
        return free
    if pooled + need > 2 * limit:  # free buffers of other sizes go first
        for bufs in _POOL.values():
            bufs[:] = [b for b in bufs if sys.getrefcount(b) > 3]
    buf = torch.empty(n, dtype=dtype)
    _POOL.setdefault((n, dtype), []).append(buf)
    return buf


# ----------------------------------------------------------------------------- RoPE-ND

class RopeND:
    """Rotary embedding over A position axes; the head dim is split between axes.

    style "paper": axis j gets d_j = head_dim * s_j / sum(s) dims with the usual
    inv_freq = base_j^(-2k/d_j), base_j = 100 ceil(8 L_j / (100 pi)); all axes' angles are laid out
    so that rotate-half pairs dims (i, i + head_dim/2) at one angle (a proper rotation per pair).
    style "reference": the thunlp/ACDiT rope.py layout (per-axis [f, f] blocks, global
    rotate-half, inv_freq from a linspace over head_dim, base from the axis length), for
    converted checkpoints.
    """

    def __init__(self, head_dim: int, split: tuple[int, ...], max_pos: tuple[int, ...], style: str = "paper"):
        self.head_dim, self.style = head_dim, style
        unit = head_dim // 2 // sum(split)
        self.dims = [2 * s * unit for s in split]  # dims per axis
        assert sum(self.dims) == head_dim, (split, head_dim)
        if style == "paper":
            self.bases = [rope_base(m) for m in max_pos]
            self.inv_freq = [b ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for b, d in zip(self.bases, self.dims)]
        else:
            self.bases = [(int(8 * m / math.pi) // 100 + 1) * 100 for m in max_pos]
            self.inv_freq = [1.0 / (b ** (torch.linspace(0, head_dim, d // 2, dtype=torch.float32).double() / head_dim))
                             for b, d in zip(self.bases, self.dims)]

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos (B, L, A) integer -> cos, sin (B, 1, L, head_dim) float32."""
        if pos.shape[-1] != len(self.inv_freq):
            raise ValueError(f"positions have {pos.shape[-1]} axes but the model's RoPE has {len(self.inv_freq)} "
                             f"(PackSpec.positions must match ModelConfig.rope_axes)")
        angles = [pos[..., j, None].double() * f.to(pos.device) for j, f in enumerate(self.inv_freq)]  # (B, L, d_j/2)
        if self.style == "paper":
            half = torch.cat(angles, -1)  # (B, L, head_dim/2)
            emb = torch.cat([half, half], -1)  # (B, L, head_dim)
        else:
            emb = torch.cat([torch.cat([a, a], -1) for a in angles], -1)  # (B, L, head_dim)
        return emb.cos().float()[:, None], emb.sin().float()[:, None]

    def tables(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos (B, L, A) integer -> the tables `apply_rope` takes: cos, and sin with its first half negated
        (B, 1, L, head_dim) float32."""
        cos, sin = self.cos_sin(pos)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], -1)


def apply_rope(x: Tensor, cos: Tensor, sin_rot: Tensor) -> Tensor:
    """x (..., B, H, L, D); cos, sin_rot (B, 1, L, D) float32 from `RopeND.tables`: x cos + rotate_half(x) sin with
    rotate_half(x) = (-x2, x1), written as the swapped halves (x2, x1) times the sine with its first half negated
    (one fused multiply-add, no negation pass); computed in (at least) float32, returned in x's dtype. The halves
    are swapped by a flip of a (2, D/2) view rather than roll(x, D/2): under torch.compile a roll's modular index
    turns the fused RoPE kernels (and their backward) into per-element gathers, a flip stays vectorised."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # (..., B, H, L, D)
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (..., B, H, L, D): (x2, x1)
    return torch.addcmul(xf * cos, swapped, sin_rot).to(x.dtype)  # (..., B, H, L, D)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in (at least) float32 with the fused kernel, returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.eps).to(x.dtype)


# ----------------------------------------------------------------------------- per-forward context

@dataclass
class AttnContext:
    """Everything attention needs for one forward pass, built once and shared by all layers."""
    layout: Layout  # queries' (doc, step, noisy), (B, L)
    cos: Tensor  # (B, 1, L, D): RopeND.tables
    sin: Tensor  # (B, 1, L, D): RopeND.tables, the sine with its first half negated
    backend: str = "sdpa"
    # cached decoding: keys are cache[:length] followed by the new tokens
    cache: object | None = None
    kv_layout: Layout | None = None  # (doc, step, noisy) of all keys (cache + new) when cache is set
    n_commit: int = 0  # leading new tokens (clean) whose K/V are committed to the cache
    _mask: Tensor | None = None
    _groups: list | None = None
    extra: dict = field(default_factory=dict)

    def dense(self) -> Tensor:
        if self._mask is None:
            if self.cache is None:
                m = _dense_cached(self.layout)  # (B, L, L)
            else:
                Lq, Lk = self.layout.shape[1], self.kv_layout.shape[1]
                dev = self.layout.doc.device
                m = masks.cross_mask(self.layout, self.kv_layout, torch.arange(Lk - Lq, Lk, device=dev),
                                     torch.arange(Lk, device=dev))  # (B, Lq, Lk)
            self._mask = m[:, None]  # (B, 1, Lq, Lk)
        return self._mask

    def split_plan(self):
        """For a cached pass: None unless every row has the same structure and every query sees the
        whole committed cache; else the query groups over this pass's own keys (the cache part
        needs no mask)."""
        if "split" not in self.extra:
            self.extra["split"] = _split_plan(self.layout, self.kv_layout)
        return self.extra["split"]

    def groups(self) -> list:
        if self._groups is None:
            self._groups = [block_groups(self.layout.row(b)) for b in range(self.layout.shape[0])] \
                if not self.layout.rows_identical() else [block_groups(self.layout.row(0))]
        return self._groups


def block_groups(row: Layout) -> list:
    """The block path's query groups of one row. Where the own kernel runs, a clean unit as long as its
    alignment gets a group of its own, which the kernel takes unmasked; ATen's kernels cost a call per
    group, so there units under 32 tokens merge into masked groups."""
    return masks.query_groups(row, small_unit=block_kernel.ALIGN if block_kernel.available() else 32)


_DENSE: dict = {}


def _dense_cached(layout: Layout) -> Tensor:
    """The dense mask of a layout, built once per distinct layout (training reuses a few)."""
    B, L = layout.shape
    if B * L * L > (1 << 26):  # large masks are not kept
        return masks.dense_mask(layout)
    key = (layout.key(), str(layout.doc.device))
    if key not in _DENSE:
        if len(_DENSE) > 16:
            _DENSE.clear()
        _DENSE[key] = masks.dense_mask(layout)
    return _DENSE[key]


_SPLIT: dict = {}


def _split_plan(q: Layout, kv: Layout):
    if not (q.rows_identical() and kv.rows_identical()):
        return None
    key = (q.row(0).key(), kv.row(0).key())
    if key in _SPLIT:
        return _SPLIT[key]
    Lq, Lk = q.shape[1], kv.shape[1]
    L0 = Lk - Lq
    cpu = [Layout(*(t[:1].cpu() for t in (x.doc, x.step, x.noisy))) for x in (q, kv)]
    m = masks.cross_mask(cpu[0], cpu[1], torch.arange(L0, Lk), torch.arange(Lk))[0]  # (Lq, Lk)
    plan = None
    if bool(m[:, :L0].all()):
        new = m[:, L0:]  # (Lq, Lq) among this pass's tokens
        change = torch.ones(Lq, dtype=torch.bool)
        change[1:] = (new[1:] != new[:-1]).any(1)
        starts = torch.nonzero(change).flatten().tolist()
        groups = []
        for a, b in zip(starts, starts[1:] + [Lq]):
            row = new[a].tolist()
            rng = masks._ranges(row, [(j, j + 1) for j in range(Lq)])
            groups.append(masks.QueryGroup(a, b, tuple(rng), None))
        plan = (L0, groups) if len(groups) <= MAX_BLOCK_GROUPS else None
    if len(_SPLIT) > 256:
        _SPLIT.clear()
    _SPLIT[key] = plan
    return plan


def _cpu_kernels():
    """ATen's fused CPU kernel per own-pass group; the committed cache through the own kernel where it
    takes the shapes (query count and cache length multiples of 16), else through ATen's."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def cached(q, ck, cv, n):
        group = masks.QueryGroup(0, q.shape[2], ((0, n),), None)
        if block_kernel.supports(q) and block_kernel.takes(group):
            o = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)  # (B, H, Lq, D)
            return o, block_kernel.forward(q, ck[:, :, :n], cv[:, :, :n], o, [group])  # lse (B, H, Lq)
        return fwd(q, ck[:, :, :n], cv[:, :, :n])[:2]
    return (lambda q, k, v: fwd(q, k, v)[:2]), cached


def _flash_kernels():
    """flash-attn (CUDA, fp16/bf16): the own-pass calls through flash_attn_func, the committed
    cache through flash_attn_with_kvcache reading the preallocated cache in place (no mask:
    every query sees the whole committed cache). Both return the log-sum-exp."""
    from flash_attn import flash_attn_func, flash_attn_with_kvcache  # optional CUDA extra

    def own(q, k, v):
        o, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
        return o.transpose(1, 2), lse  # (B, H, n, D), (B, H, n)

    def cached(q, ck, cv, n):
        o, lse = flash_attn_with_kvcache(q.transpose(1, 2).contiguous(), ck.transpose(1, 2), cv.transpose(1, 2),
                                         cache_seqlens=n, return_softmax_lse=True)
        return o.transpose(1, 2), lse  # (B, H, Lq, D), (B, H, Lq)
    return own, cached


def _cached_split_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer: int) -> Tensor:
    """A cached pass without concatenating or repeating the cache: every query sees the whole
    committed cache (one unmasked call; the S guidance streams' queries are stacked along the
    query axis against the cache's B rows), and its own pass's keys by query group; the two
    partial softmaxes are merged by their log-sum-exp. Kernels: on CPU the own kernel (all own-pass
    groups in one call) where it takes them, else ATen's fused kernel per group; flash-attn's for
    backend "flash"."""
    own, cached = _flash_kernels() if ctx.backend == "flash" else _cpu_kernels()
    cache = ctx.cache
    L0, groups = ctx.split_plan()
    SB, H, Lq, D = q.shape
    B = cache.batch
    S = SB // B
    cache.commit(layer, k, v, ctx.n_commit)
    if ctx.backend != "flash" and block_kernel.supports(q) and all(block_kernel.takes(g) for g in groups):
        o_new = q.new_empty(SB, Lq, H, D).transpose(1, 2)  # (S*B, H, Lq, D)
        lse_new = block_kernel.forward(q, k, v, o_new, groups)  # (S*B, H, Lq)
    else:
        o_new = q.new_empty(SB, H, Lq, D)  # (S*B, H, Lq, D)
        lse_new = q.new_empty(SB, H, Lq, dtype=torch.float32)  # (S*B, H, Lq)
        for g in groups:
            o, lse = own(q[:, :, g.q0:g.q1], _gather(k, g.k_ranges), _gather(v, g.k_ranges))
            o_new[:, :, g.q0:g.q1], lse_new[:, :, g.q0:g.q1] = o, lse
    if L0 == 0:
        return o_new
    ck, cv = cache.committed(layer, cache.max_len)  # (B, H, max_len, D) each, the first L0 committed
    if ck.dtype != q.dtype:  # a cache kept in another dtype than this pass's: its committed part, converted
        ck, cv = ck[:, :, :L0].to(q.dtype), cv[:, :, :L0].to(q.dtype)  # (B, H, L0, D) each
    if S == 1:
        o_c, lse_c = cached(q, ck, cv, L0)  # (B, H, Lq, D), (B, H, Lq)
    else:
        qs = q.reshape(S, B, H, Lq, D).permute(1, 2, 0, 3, 4).reshape(B, H, S * Lq, D)  # (B, H, S*Lq, D)
        o_c, lse_c = cached(qs, ck, cv, L0)  # (B, H, S*Lq, D), (B, H, S*Lq)
        o_c = o_c.view(B, H, S, Lq, D).permute(2, 0, 1, 3, 4).reshape(SB, H, Lq, D)  # (S*B, H, Lq, D)
        lse_c = lse_c.view(B, H, S, Lq).permute(2, 0, 1, 3).reshape(SB, H, Lq)  # (S*B, H, Lq)
    w_c = torch.sigmoid(lse_c.float() - lse_new).unsqueeze(-1).to(q.dtype)  # (S*B, H, Lq, 1): exp(lse_c - logaddexp)
    return torch.lerp(o_new, o_c, w_c)  # (S*B, H, Lq, D): w_c o_c + (1 - w_c) o_new


_REPLACED: set = set()  # the (requested, chosen, reason) cases warned about


def _replace(requested: str, chosen: str, reason: str) -> str:
    if (requested, chosen, reason) not in _REPLACED:
        _REPLACED.add((requested, chosen, reason))
        warnings.warn(f"attention backend {requested!r}: {reason}; these passes use {chosen!r}", stacklevel=3)
    return chosen


def choose_backend(requested: str, layout: Layout, device: torch.device, training: bool, cached: bool) -> str:
    """The backend of one pass: the requested one where it can run that pass, else what "auto" picks."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    cuda = device.type == "cuda"
    if requested == "flash" and not (cuda and _has_flash()):
        auto = choose_backend("auto", layout, device, training, cached)
        return _replace("flash", auto, f"needs CUDA and the flash-attn package (device {device.type}, flash-attn "
                                       f"{'installed' if _has_flash() else 'not installed'})")
    if cached:
        if requested == "flash" or (requested == "auto" and cuda and _has_flash()):
            return "flash"
        if requested in ("auto", "block") and not cuda:
            return "block"
        if requested in ("block", "flex"):
            return _replace(requested, choose_backend("auto", layout, device, training, cached),
                            f"has no cached-pass path on {device.type}")
        return "sdpa"
    if requested == "flash":  # it serves cached passes; the others take auto's choice
        requested = "auto"
    if requested == "flex" and not cuda and training and torch.is_grad_enabled():
        return _replace("flex", choose_backend("auto", layout, device, training, cached),
                        "FlexAttention has no backward on CPU")
    if requested != "auto":
        return requested
    if cuda:
        return "flex"
    if layout.rows_identical():
        groups = block_groups(layout.row(0))
        n = block_kernel.per_list("aten", groups, lambda gs: sum(not block_kernel.takes(g) for g in gs)) \
            if block_kernel.available() else len(groups)
        return "block" if n <= MAX_BLOCK_GROUPS else "sdpa"
    return "sdpa"


@functools.cache
def _has_flash() -> bool:
    """Whether flash-attn imports (once per process: choose_backend asks on every pass)."""
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- the dispatch

def attend(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer: int = 0) -> Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lq, D) of this pass's tokens -> (B, H, Lq, D) under the
    context's mask; with a KV cache the keys are the cache's followed by these (the first
    ctx.n_commit of which are committed to the cache here).
    On CPU, reduced-precision inputs of the dense-mask SDPA path are attended in fp32; the block
    and cached paths run their kernels in the inputs' dtype (fp32 accumulation and softmax inside):
    the own kernel forward and backward where it takes the group, else ATen's, whose backward runs in
    fp32 for query groups under LOW_BWD_MIN_QUERIES; the gradients are summed in fp32."""
    if attends_in_fp32(q, ctx):  # with CPU autocast off: it would cast SDPA's fp32 inputs back to bf16
        with torch.autocast("cpu", enabled=False):
            return _attend_pass(q.float(), k.float(), v.float(), ctx, layer).to(q.dtype)
    return _attend_pass(q, k, v, ctx, layer)


def _attend_pass(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer: int) -> Tensor:
    if ctx.cache is not None:
        if ctx.backend == "block" and ctx.split_plan() is not None:
            return _cached_split_attention(q, k, v, ctx, layer)
        if ctx.backend == "flash" and q.dtype in (torch.float16, torch.bfloat16) and ctx.split_plan() is not None:
            return _cached_split_attention(q, k, v, ctx, layer)
        k, v = ctx.cache.keys_values(layer, k, v, ctx.n_commit)  # (B, H, Lc + Lq, D)
    return _attend(q, k, v, ctx)


def attends_in_fp32(q: Tensor, ctx: AttnContext) -> bool:
    """Reduced-precision attention inputs of the CPU dense-mask path are attended in fp32."""
    return q.device.type == "cpu" and q.dtype != torch.float64 and (
        ctx.backend == "sdpa" or (ctx.backend == "block" and ctx.cache is not None and ctx.split_plan() is None))


def _attend(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
    if ctx.backend == "sdpa" or (ctx.backend in ("block", "flash") and ctx.cache is not None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.dense())
    if ctx.backend == "block":
        return _block_attention(q, k, v, ctx)
    if ctx.backend == "flex":
        return _flex_attention(q, k, v, ctx)
    raise ValueError(f"unknown attention backend {ctx.backend!r}")


def _block_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
    all_groups = ctx.groups()
    if q.device.type == "cpu":
        grad = torch.is_grad_enabled()
        row = lambda q, k, v, groups: _BlockSDPA.apply(q, k, v, groups, grad)  # noqa: E731
    else:
        row = _block_row_autograd
    if len(all_groups) == 1:
        return row(q, k, v, all_groups[0])
    return torch.cat([row(q[b:b + 1], k[b:b + 1], v[b:b + 1], g) for b, g in enumerate(all_groups)], 0)


def _gather(x: Tensor, ranges) -> Tensor:
    if len(ranges) == 1:
        s, e = ranges[0]
        return x[:, :, s:e]  # (B, H, m, D)
    return torch.cat([x[:, :, s:e] for s, e in ranges], 2)  # (B, H, m, D)


def _additive(mask: Tensor | None, dtype: torch.dtype, device) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask.to(device), float("-inf"))


def _block_row_autograd(q: Tensor, k: Tensor, v: Tensor, groups: list) -> Tensor:
    outs = []
    for g in groups:
        if not g.k_ranges:  # padding: each token sees only itself
            outs.append(v[:, :, g.q0:g.q1])
            continue
        mask = None if g.mask is None else g.mask.to(q.device)
        outs.append(F.scaled_dot_product_attention(q[:, :, g.q0:g.q1], _gather(k, g.k_ranges), _gather(v, g.k_ranges),
                                                   attn_mask=mask))  # (B, H, n, D)
    return torch.cat(outs, 2)  # (B, H, L, D)


def _kernel_split(q: Tensor, groups: list) -> tuple[list, list]:
    """The groups the fused CPU kernel takes (`block_kernel.takes`) and the rest (ATen's kernels)."""
    if not block_kernel.supports(q):
        return [], groups
    return block_kernel.per_list("split", groups, lambda gs: (
        [g for g in gs if block_kernel.takes(g)], [g for g in gs if not block_kernel.takes(g)]))


class _BlockSDPA(torch.autograd.Function):
    """The block path on CPU: the own kernel over the groups it takes (one call for all of them),
    one ATen fused-kernel SDPA call per remaining group; gradients written straight into preallocated
    fp32 dq/dk/dv instead of autograd's per-slice full-size buffers."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, groups: list, grad: bool) -> Tensor:
        B, H, L, D = q.shape
        out = torch.empty_strided((B, H, L, D), (L * H * D, D, H * D, 1), dtype=q.dtype,
                                  device=q.device)  # (B, H, L, D), memory as (B, L, H, D)
        fused, rest = _kernel_split(q, groups)
        probs = None  # the fused groups' probabilities, kept for the backward
        if fused and grad and any(ctx.needs_input_grad[:3]):
            probs = _probs_buffer(block_kernel.probs_numel(B, H, fused, q.dtype), q.dtype)
        lse_fused = block_kernel.forward(q, k, v, out, fused, probs) if fused else None  # (B, H, L) on fused rows
        saved = []
        for g in rest:
            if not g.k_ranges:
                out[:, :, g.q0:g.q1] = v[:, :, g.q0:g.q1]
                saved.append(None)
                continue
            mask = _additive(g.mask, q.dtype, q.device)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, g.q0:g.q1], _gather(k, g.k_ranges), _gather(v, g.k_ranges), attn_mask=mask)
            out[:, :, g.q0:g.q1] = o  # (B, H, n, D)
            saved.append((lse, mask))
        ctx.groups, ctx.saved, ctx.fused = rest, saved, fused
        ctx.save_for_backward(q, k, v, out, lse_fused)
        ctx.probs = probs  # an attribute, not saved: the tensor object lives as long as the graph needs it
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        dtype = dout.dtype
        q, k, v, out, lse_fused = ctx.saved_tensors
        probs = ctx.probs
        if ctx.fused and not ctx.groups:  # the kernel alone: gradients straight in the inputs' dtype
            return (*block_kernel.backward(q, k, v, out, dout, lse_fused, ctx.fused, dtype, probs), None, None)
        if ctx.fused:  # fp32 accumulators, started by the kernel
            dq, dk, dv = block_kernel.backward(q, k, v, out, dout, lse_fused, ctx.fused, torch.float32, probs)
        else:
            dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v))  # fp32 accumulators
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        low = q.dtype != torch.float32
        small = [low and g.q1 - g.q0 < LOW_BWD_MIN_QUERIES for g in ctx.groups]
        f32 = tuple(t.float() for t in (dout, q, k, v, out)) if any(small) else None
        for g, sv, sm in zip(ctx.groups, ctx.saved, small):
            if sv is None:
                dv[:, :, g.q0:g.q1] += dout[:, :, g.q0:g.q1]
                continue
            lse, mask = sv  # the additive mask is in the inputs' dtype
            do_, q_, k_, v_, o_ = f32 if sm else (dout, q, k, v, out)  # this group's kernel dtype
            mask = mask.float() if sm and mask is not None else mask
            gq, gk, gv = bwd(do_[:, :, g.q0:g.q1], q_[:, :, g.q0:g.q1], _gather(k_, g.k_ranges),
                             _gather(v_, g.k_ranges), o_[:, :, g.q0:g.q1], lse, 0.0, False, attn_mask=mask)
            dq[:, :, g.q0:g.q1] = gq
            o = 0
            for s, e in g.k_ranges:
                dk[:, :, s:e] += gk[:, :, o:o + e - s]
                dv[:, :, s:e] += gv[:, :, o:o + e - s]
                o += e - s
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None


_FLEX = {}


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention
    bm = masks.block_mask(ctx.layout)
    if q.device.type == "cuda":
        if "compiled" not in _FLEX:
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
        return _FLEX["compiled"](q, k, v, block_mask=bm)
    return flex_attention(q, k, v, block_mask=bm)


# ----------------------------------------------------------------------------- the module

class Attention(nn.Module):
    """The attention projections of a block: `project` (before the dispatch) and `out` (after it);
    the block calls project -> attend -> out so that both sides can be compiled apart from attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim, self.qk_norm = num_heads, dim // num_heads, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor, fp32: bool) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, C) -> q, k, v (B, H, L, D): fused QKV, QK-norm and RoPE (in at least fp32; cos, sin from
        `RopeND.tables`); with `fp32` the three come out in fp32 for the CPU kernels, else in the projection's dtype."""
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
        if fp32:  # cast once: QK-norm, RoPE and the kernel all run in fp32
            qkv = qkv.float()  # (3, B, H, L, D)
        hi = torch.promote_types(qkv.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
        qk, v = qkv[:2].to(hi), qkv[2]  # (2, B, H, L, D), (B, H, L, D)
        if self.qk_norm:  # q and k normalised in one call, each with its own weight
            w = torch.stack([self.q_norm.weight, self.k_norm.weight]).to(hi)[:, None, None, None]  # (2, 1, 1, 1, D)
            qk = F.rms_norm(qk, (self.head_dim,), eps=self.q_norm.eps) * w  # (2, B, H, L, D)
        q, k = apply_rope(qk, cos, sin).to(v.dtype).unbind(0)  # 2 x (B, H, L, D)
        return q, k, v

    def out(self, o: Tensor) -> Tensor:
        """o (B, H, L, D) -> (B, L, C) through the output projection (in the weights' dtype, or autocast's)."""
        B, H, L, D = o.shape
        if not torch.is_autocast_enabled(o.device.type):
            o = o.to(self.proj.weight.dtype)  # (B, H, L, D)
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))  # (B, L, C)
