"""The composite SCAM + causal mask: one predicate (DESIGN.md section 2), every mask derived from it.

Every token carries (doc, step, noisy). q may attend kv iff doc[q] == doc[kv] >= 0 and
    clean kv, clean q: step[kv] <= step[q]
    clean kv, noisy q: step[kv] <  step[q]
    noisy kv, noisy q: step[kv] == step[q] and noisy[kv] == noisy[q]
    noisy kv, clean q: never
and a padding token (doc = -1) attends only itself.

`noisy` is 0 for clean tokens and 1 for the noised copy of a block. A sampling pass with
classifier-free guidance carries one noised copy of the block per guidance stream, numbered
1..S, in the same row as the shared clean context: each copy sees the clean past and itself,
never another copy. Training layouts only hold 0/1, where the extra condition is always true.

`allowed` is written with tensor operations only, so the same function serves the dense
boolean mask (broadcast), the FlexAttention `mask_mod` (scalar tensors under vmap), the
block-structured CPU path (unit-level table) and the KV-cache decode mask. This module
knows nothing of the network.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor


def allowed(q_idx: Tensor, kv_idx: Tensor,
            doc_q: Tensor, step_q: Tensor, noisy_q: Tensor,
            doc_k: Tensor, step_k: Tensor, noisy_k: Tensor) -> Tensor:
    """The predicate. All arguments broadcast against each other; returns a bool tensor."""
    same_doc = (doc_q == doc_k) & (doc_q >= 0)
    clean_k, clean_q = noisy_k == 0, noisy_q == 0
    rule = (clean_k & clean_q & (step_k <= step_q)) \
        | (clean_k & ~clean_q & (step_k < step_q)) \
        | (~clean_k & ~clean_q & (step_k == step_q) & (noisy_k == noisy_q))
    pad_self = (doc_q < 0) & (q_idx == kv_idx)
    return (same_doc & rule) | pad_self


@dataclass(frozen=True)
class Layout:
    """Per-token (doc, step, noisy) of a batch of packed rows, each (B, L) int32/int64."""
    doc: Tensor
    step: Tensor
    noisy: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc.shape)

    def key(self) -> tuple:
        """A hashable identity of the layout (for caching masks per layout)."""
        return (tuple(self.doc.shape), _bytes(self.doc), _bytes(self.step), _bytes(self.noisy))

    def row(self, b: int) -> "Layout":
        return Layout(self.doc[b:b + 1], self.step[b:b + 1], self.noisy[b:b + 1])

    def rows_identical(self) -> bool:
        return bool((self.doc == self.doc[:1]).all() and (self.step == self.step[:1]).all()
                    and (self.noisy == self.noisy[:1]).all())


def _bytes(t: Tensor) -> bytes:
    return t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()


def dense_mask(layout: Layout) -> Tensor:
    """(B, L, L) bool: True where query i may attend key j."""
    doc, step, noisy = layout.doc, layout.step, layout.noisy
    L = doc.shape[1]
    idx = torch.arange(L, device=doc.device)
    return allowed(idx[:, None], idx[None, :],                       # (L, 1), (1, L)
                   doc[:, :, None], step[:, :, None], noisy[:, :, None],  # (B, L, 1)
                   doc[:, None, :], step[:, None, :], noisy[:, None, :])  # (B, 1, L)


def cross_mask(q: Layout, k: Layout, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """(B, Lq, Lk) bool for queries and keys from different tensors (the KV-cache decode path).
    q_pos / k_pos: (Lq,) / (Lk,) absolute indices, used only by the padding self-rule."""
    return allowed(q_pos[:, None], k_pos[None, :],
                   q.doc[:, :, None], q.step[:, :, None], q.noisy[:, :, None],
                   k.doc[:, None, :], k.step[:, None, :], k.noisy[:, None, :])


def mask_mod(layout: Layout):
    """FlexAttention mask_mod closed over the layout tensors."""
    doc, step, noisy = layout.doc, layout.step, layout.noisy

    def mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx, doc[b, q_idx], step[b, q_idx], noisy[b, q_idx],
                       doc[b, kv_idx], step[b, kv_idx], noisy[b, kv_idx])
    return mod


_BLOCK_MASKS: dict = {}


def block_mask(layout: Layout, block_size: int = 128):
    """FlexAttention BlockMask for the layout (cached per layout and device)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = (layout.key(), str(layout.doc.device), block_size)
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        B, L = layout.shape
        _BLOCK_MASKS[key] = create_block_mask(mask_mod(layout), B=B, H=None, Q_LEN=L, KV_LEN=L,
                                              device=layout.doc.device, BLOCK_SIZE=block_size)
    return _BLOCK_MASKS[key]


# ----------------------------------------------------------------------------- block structure

@dataclass(frozen=True)
class QueryGroup:
    """A contiguous run of queries [q0, q1) and the key ranges it may see (union over the run).
    `mask` is None when every (query, key) pair of the group is allowed, else (q1-q0, n_keys) bool.
    No key ranges: a padding run, each query seeing only itself (its output is its own value)."""
    q0: int
    q1: int
    k_ranges: tuple[tuple[int, int], ...]
    mask: Tensor | None


def _units(doc: Tensor, step: Tensor, noisy: Tensor) -> list[tuple[int, int]]:
    """Maximal runs [s, e) of equal (doc, step, noisy) along one row."""
    L = doc.shape[0]
    change = torch.ones(L, dtype=torch.bool)
    change[1:] = (doc[1:] != doc[:-1]) | (step[1:] != step[:-1]) | (noisy[1:] != noisy[:-1])
    starts = torch.nonzero(change).flatten().tolist()
    return list(zip(starts, starts[1:] + [L]))


def _ranges(flags: list[bool], units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for f, (s, e) in zip(flags, units):
        if not f:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def query_groups(layout: Layout, max_group: int = 256, small_unit: int = 32) -> list[QueryGroup]:
    """Partition one row's queries into groups whose visible keys form few contiguous ranges.

    Units (runs of equal (doc, step, noisy)) are evaluated with `allowed` at unit level, which is
    exact because every token of a unit has the same triple. Consecutive units are merged into
    one group when they are clean, shorter than `small_unit` tokens (text runs, tiny blocks) and the
    merged group sees nothing beyond its own end, up to `max_group` queries; such a group's
    sub-mask comes from `allowed` too. Larger units get a call of their own, unmasked where they
    see their keys fully, so the empty part of SCAM is never computed for them.
    """
    assert layout.shape[0] == 1, "query_groups works on one row"
    return _query_groups_cached(layout.key(), layout, max_group, small_unit)


_GROUPS: dict = {}


def _query_groups_cached(key, layout: Layout, max_group: int, small_unit: int) -> list[QueryGroup]:
    ck = (key, max_group, small_unit)
    if ck in _GROUPS:
        return _GROUPS[ck]
    doc, step, noisy = (t[0].to("cpu", torch.int64) for t in (layout.doc, layout.step, layout.noisy))
    units = _units(doc, step, noisy)
    starts = torch.tensor([s for s, _ in units])
    ud, us, un = doc[starts], step[starts], noisy[starts]
    U = len(units)
    ui = torch.arange(U)
    # unit-level table; the padding self-rule is token-level, so padding units are 1-token-exact below
    table = allowed(ui[:, None], ui[None, :], ud[:, None], us[:, None], un[:, None],
                    ud[None, :], us[None, :], un[None, :])  # (U, U)
    groups: list[QueryGroup] = []
    i = 0
    while i < U:
        j = i + 1
        vis = table[i].clone()
        small = units[i][1] - units[i][0] < small_unit
        while small and j < U and units[j][1] - units[j][0] < small_unit \
                and units[j][1] - units[i][0] <= max_group and ud[j] == ud[i] and ud[i] >= 0 \
                and un[j] == un[i] and un[i] == 0 and _extends_prefix(table, vis, i, j):
            vis |= table[j]
            j += 1
        q0, q1 = units[i][0], units[j - 1][1]
        if ud[i] < 0:  # padding run: each token sees only itself, one group without key ranges
            groups.append(QueryGroup(q0, q1, (), None))
            i = j
            continue
        rng = _ranges(vis.tolist(), units)
        kidx = torch.cat([torch.arange(s, e) for s, e in rng])
        qidx = torch.arange(q0, q1)
        sub = allowed(qidx[:, None], kidx[None, :], doc[qidx][:, None], step[qidx][:, None],
                      noisy[qidx][:, None], doc[kidx][None, :], step[kidx][None, :], noisy[kidx][None, :])
        groups.append(QueryGroup(q0, q1, tuple(rng), None if bool(sub.all()) else sub))
        i = j
    if len(_GROUPS) > 64:
        _GROUPS.clear()
    _GROUPS[ck] = groups
    return groups


def _extends_prefix(table: Tensor, vis: Tensor, i: int, j: int) -> bool:
    """Unit j may join group [i, j): it sees what the group sees plus only units inside [i, j]."""
    new = table[j] & ~vis
    idx = torch.nonzero(new).flatten()
    return bool(((idx >= i) & (idx <= j)).all())
