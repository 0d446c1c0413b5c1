"""The KV cache: an explicit, preallocated object holding post-RoPE keys/values of clean tokens.

Protocol (DESIGN.md section 5). A forward pass over new tokens sees the committed cache
followed by the new tokens. The first `n_commit` new tokens are clean (a finished block's
pending clean copy, text tokens) and their K/V are committed during that same pass; the
rest (a noised block, or its S guidance copies side by side) only attend and are never stored.
The cache has `batch` rows. The sampler lays guidance streams along the sequence (one row per
sample, the clean tokens once); a pass may also carry S * batch rows (streams stacked on the
batch axis, sharing the cache), whose clean K/V are then committed from the first stream.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masks import Layout


class KVCache:
    def __init__(self, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.kv = torch.zeros(n_layers, 2, batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.doc = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.step = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0
        self.batch, self.max_len = batch, max_len

    @staticmethod
    def for_model(model, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> "KVCache":
        cfg = model.cfg
        p = next(model.parameters())
        return KVCache(cfg.depth, batch, cfg.num_heads, max_len, cfg.head_dim, dtype or p.dtype, device or p.device)

    def reset(self) -> None:
        self.length = 0
        self.doc.fill_(-1)

    def _streams(self, rows: int) -> int:
        if rows % self.batch:
            raise ValueError(f"a pass with {rows} rows cannot share a cache of {self.batch} rows")
        return rows // self.batch

    def key_layout(self, new: Layout) -> Layout:
        """(doc, step, noisy) of all keys of a pass: the committed cache, then the new tokens."""
        S = self._streams(new.shape[0])
        L0 = self.length
        doc = self.doc[:, :L0].repeat(S, 1)  # (S*B, L0)
        step = self.step[:, :L0].repeat(S, 1)  # (S*B, L0)
        return Layout(torch.cat([doc, new.doc], 1), torch.cat([step, new.step], 1),
                      torch.cat([torch.zeros_like(doc), new.noisy], 1))

    def keys_values(self, layer: int, k: Tensor, v: Tensor, n_commit: int) -> tuple[Tensor, Tensor]:
        """k/v (S*B, H, n, D) of the new tokens -> keys/values of the pass (S*B, H, L0 + n, D);
        commits the first n_commit new tokens' K/V of the first stream."""
        L0 = self.length
        S = self._streams(k.shape[0])
        self.commit(layer, k, v, n_commit)
        ck, cv = self.committed(layer, L0)  # (B, H, L0, D) each
        ck, cv = ck.to(k.dtype), cv.to(v.dtype)  # a no-op unless the pass attends in another dtype
        if S > 1:
            ck, cv = ck.repeat(S, 1, 1, 1), cv.repeat(S, 1, 1, 1)  # (S*B, H, L0, D)
        return torch.cat([ck, k], 2), torch.cat([cv, v], 2)  # (S*B, H, L0 + n, D)

    def commit(self, layer: int, k: Tensor, v: Tensor, n_commit: int) -> None:
        """Write the first n_commit new tokens' K/V (k/v (S*B, H, n, D), first stream) at the end."""
        B, L0 = self.batch, self.length
        if L0 + n_commit > self.max_len:
            raise RuntimeError(f"KV cache full: {L0} + {n_commit} tokens > max_len {self.max_len}")
        self._streams(k.shape[0])
        if n_commit:
            self.kv[layer, 0, :, :, L0:L0 + n_commit] = k[:B, :, :n_commit]
            self.kv[layer, 1, :, :, L0:L0 + n_commit] = v[:B, :, :n_commit]

    def committed(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """Views (B, H, n, D) of the first n committed keys and values of a layer."""
        return self.kv[layer, 0, :, :, :n], self.kv[layer, 1, :, :, :n]

    def advance(self, n_commit: int, new: Layout) -> None:
        """After all layers: the committed tokens' (doc, step) become part of the cache."""
        if n_commit:
            if bool(new.noisy[:self.batch, :n_commit].any()):
                raise ValueError("only clean tokens can be committed to the KV cache")
            L0 = self.length
            self.doc[:, L0:L0 + n_commit] = new.doc[:self.batch, :n_commit]
            self.step[:, L0:L0 + n_commit] = new.step[:self.batch, :n_commit]
            self.length = L0 + n_commit
