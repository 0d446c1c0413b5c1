"""ACDiT: a DiT over a packed mixed sequence of text tokens, clean blocks and noised blocks.

Linear patch embed/unembed, RMSNorm, QK-norm, RoPE-ND, adaLN-Zero applied to noised tokens
only (clean and text tokens are never modulated), a text embedding and LM head. Parameter
names follow DiT / the reference implementation where they exist.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttnContext, RMSNorm, RopeND, attend, attends_in_fp32, choose_backend
from .config import ModelConfig
from .masks import Layout
from .sequence import TEXT


@dataclass
class ModelInput:
    """One forward pass worth of tokens. `cond_index` points noised tokens at a row of the
    conditioning table (t[i], y[i]); -1 marks tokens that get no modulation."""
    tokens: Tensor  # (B, L) long, text ids (ignored elsewhere)
    patches: Tensor  # (B, L, P) patch vectors (noised values at noised tokens)
    is_text: Tensor  # (B, L) bool
    layout: Layout  # (B, L) doc / step / noisy
    pos: Tensor  # (B, L, A) long
    cond_index: Tensor  # (B, L) long
    t: Tensor  # (n_cond,) timesteps (float or long)
    y: Tensor  # (n_cond,) class labels, num_classes = null


@dataclass
class ModelOutput:
    eps: Tensor  # (B, L, P) predicted noise at noised tokens, 0 elsewhere
    logits: Tensor | None  # (N, V) at the requested text positions
    hidden: Tensor | None = None  # (B, L, H) final normalised hidden states, when requested


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = {"gelu_tanh": "tanh", "gelu": "none"}[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(x), self.approximate))


def gelu(x: Tensor, approximate: str) -> Tensor:
    """F.gelu; under torch.compile its tanh form as x sigmoid(2u) (the same function: (1 + tanh u) / 2 =
    sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)), which Inductor computes with one exp where its tanh is
    Sleef's 1-ULP one: forward + backward on (4096, 3072) bf16 2.2x faster on a Zen 4, outputs within
    bf16 rounding."""
    if approximate == "tanh" and torch.compiler.is_compiling():
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2/pi) = 1.5957...
    return F.gelu(x, approximate=approximate)


class Modulation:
    """Applies adaLN parameters to the conditioned (noised) tokens only; clean and text tokens
    pass through unmodulated. Built once per forward from `cond_index` (B, L).

    Without conditioned tokens (text-only passes) nothing is modulated or gated. Fast path: when every
    row's conditioned tokens form one contiguous range made of equal runs (the blocks of a packed
    sample), parameters are broadcast per block over a view, with no per-token gather. Otherwise a
    per-token table lookup with an identity row for the rest."""

    def __init__(self, cond_index: Tensor):
        self.index = cond_index
        self.B, self.L = cond_index.shape
        self.none = not bool((cond_index >= 0).any())
        self.fast = self._plan(cond_index)

    @staticmethod
    def _plan(ci: Tensor):
        on = ci >= 0  # (B, L)
        if not bool(on.any()) or not bool((on == on[:1]).all()):
            return None
        sel = torch.nonzero(on[0]).flatten()
        s, e = int(sel[0]), int(sel[-1]) + 1
        if e - s != sel.numel():
            return None
        seg = ci[:, s:e]  # (B, n)
        change = torch.nonzero(seg[0, 1:] != seg[0, :-1]).flatten()
        bs = int(change[0]) + 1 if change.numel() else e - s
        if (e - s) % bs:
            return None
        runs = seg.reshape(seg.shape[0], -1, bs)  # (B, nb, bs)
        if not bool((runs == runs[:, :, :1]).all()):
            return None
        return s, e, bs, runs[:, :, 0]  # rows of the table per (row, block)

    def params(self, table: Tensor, k: int) -> list[Tensor]:
        """table (n_cond, k*H) -> k parameter tensors broadcastable to the conditioned tokens (None when
        no token is conditioned)."""
        if self.none:
            return [None] * k
        if self.fast is not None:
            idx = self.fast[3]  # (B, nb)
            return list(table[idx][:, :, None].chunk(k, dim=-1))  # k x (B, nb, 1, H)
        ident = table.new_zeros(1, k, table.shape[-1] // k)  # (1, k, H): shift 0, scale 0, gate 1
        if k == 6:
            ident[:, 2] = 1
            ident[:, 5] = 1
        table = torch.cat([ident.view(1, -1), table], 0)  # (1 + n_cond, k*H)
        return list(table[self.index + 1].chunk(k, dim=-1))  # k x (B, L, H)

    def _split(self, x: Tensor):
        s, e, bs, _ = self.fast
        B, _, H = x.shape
        return x[:, :s], x[:, s:e].reshape(B, -1, bs, H), x[:, e:]

    def modulate(self, h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """h: a fresh (B, L, H) activation (a norm's output); without autograd it is modulated in place."""
        if self.none:
            return h
        if self.fast is None:
            return h * (1 + scale) + shift
        a, n, b = self._split(h)
        if not torch.is_grad_enabled() and h.is_contiguous():
            n.mul_(1 + scale).add_(shift)  # (B, nb, bs, H), a view of h
            return h
        n = n * (1 + scale) + shift  # (B, nb, bs, H)
        return torch.cat([a, n.flatten(1, 2), b], 1)  # (B, L, H)

    def residual(self, x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
        """x + gate * y at conditioned tokens, x + y elsewhere; y: a fresh (B, L, H) branch output
        (gated in place without autograd), x is never modified."""
        if self.none:
            return x + y  # (B, L, H)
        if self.fast is None:
            return x + gate * y
        ya, yn, yb = self._split(y)
        if not torch.is_grad_enabled() and y.is_contiguous():
            yn.mul_(gate)  # (B, nb, bs, H), a view of y
            return x + y  # (B, L, H)
        xa, xn, xb = self._split(x)
        return torch.cat([xa + ya, (xn + gate * yn).flatten(1, 2), xb + yb], 1)  # (B, L, H)


class Block(nn.Module):
    """Transformer block; adaLN-Zero modulation for the tokens that carry a conditioning row."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.norm1 = RMSNorm(H, eps=cfg.norm_eps)
        self.attn = Attention(H, cfg.num_heads, cfg.qk_norm, cfg.norm_eps)
        self.norm2 = RMSNorm(H, eps=cfg.norm_eps)
        self.mlp = Mlp(H, int(H * cfg.mlp_ratio), cfg.mlp_act)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))

    def forward(self, x: Tensor, c: Tensor, mod: Modulation, ctx: AttnContext, layer: int,
                compiled: bool = False) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.params(self.adaLN_modulation(c), 6)
        pre, post = _compiled_regions() if compiled else (_pre_attention, _post_attention)
        q, k, v = pre(self, x, shift1, scale1, mod, ctx.cos, ctx.sin, attends_in_fp32(x, ctx))  # 3 x (B, H, L, D)
        o = attend(q, k, v, ctx, layer)  # (B, H, L, D)
        return post(self, x, o, gate1, shift2, scale2, gate2, mod)  # (B, L, H)


def _pre_attention(blk: Block, x: Tensor, shift: Tensor, scale: Tensor, mod: Modulation, cos: Tensor, sin: Tensor,
                   fp32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """norm1, modulation, QKV, QK-norm, RoPE: x (B, L, H) -> q, k, v (B, heads, L, D)."""
    return blk.attn.project(mod.modulate(blk.norm1(x), shift, scale), cos, sin, fp32)


def _post_attention(blk: Block, x: Tensor, o: Tensor, gate1: Tensor, shift2: Tensor, scale2: Tensor, gate2: Tensor,
                    mod: Modulation) -> Tensor:
    """Output projection, gated residual, norm2, modulation, MLP, gated residual -> (B, L, H)."""
    x = mod.residual(x, blk.attn.out(o), gate1)  # (B, L, H)
    return mod.residual(x, blk.mlp(mod.modulate(blk.norm2(x), shift2, scale2)), gate2)  # (B, L, H)


_REGIONS: dict = {}


def _compiled_regions():
    """The attention-free parts of a block under torch.compile (one compilation shared by all
    blocks; attention stays with the dispatch): Inductor fuses the norms, modulation, RoPE,
    GELU and residuals with their backward."""
    if not _REGIONS:
        _REGIONS["pre"] = torch.compile(_pre_attention, dynamic=False)
        _REGIONS["post"] = torch.compile(_post_attention, dynamic=False)
    return _REGIONS["pre"], _REGIONS["post"]


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int, eps: float):
        super().__init__()
        self.norm_final = RMSNorm(hidden, eps=eps)
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (N, H) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, P)


class ACDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.patch_dim, H, bias=False)
        self.t_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embedder = TimestepEmbedding(256, H)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, H) if cfg.num_classes > 0 else None
        self.tok_embedder = nn.Embedding(cfg.vocab_size, H) if cfg.vocab_size > 0 else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(H, cfg.patch_dim, cfg.norm_eps)
        if cfg.vocab_size > 0:
            self.text_norm = RMSNorm(H, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.rope = RopeND(cfg.head_dim, cfg.rope_split, cfg.rope_max_pos, cfg.rope_style)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=self.cfg.class_embed_std)
        if self.tok_embedder is not None:
            nn.init.normal_(self.tok_embedder.weight, std=0.02)
            nn.init.zeros_(self.lm_head.weight)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """(n,) timesteps, (n,) labels -> (n, H) conditioning vectors."""
        c = self.t_embedder(self.t_proj(t.float()).to(self.x_embedder.weight.dtype))  # (n, H)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)  # (n, H)
        return c

    def forward(self, inp: ModelInput, logits_at: Tensor | None = None, cache=None, n_commit: int = 0,
                return_hidden: bool = False) -> ModelOutput:
        """Training / full forward (cache None), or a cached pass over new tokens whose first
        `n_commit` (clean) tokens are committed to `cache` (a KVCache) during the pass."""
        B, L = inp.tokens.shape
        # the residual stream in the weights' dtype (fp32 master weights under autocast, as text embeddings are)
        x = self.x_embedder(inp.patches).to(self.x_embedder.weight.dtype)  # (B, L, H)
        if self.tok_embedder is not None:
            x = torch.where(inp.is_text[..., None], self.tok_embedder(inp.tokens.clamp(min=0)), x)  # (B, L, H)
        c = self.condition(inp.t, inp.y)  # (n_cond, H)
        cos, sin = self.rope.tables(inp.pos)  # (B, 1, L, Dh) each: cos, and sin with its first half negated
        backend = choose_backend(self.cfg.attn_backend, inp.layout, x.device, self.training, cache is not None)
        kv_layout = cache.key_layout(inp.layout) if cache is not None else None
        ctx = AttnContext(inp.layout, cos, sin, backend, cache=cache, kv_layout=kv_layout, n_commit=n_commit)
        mod = Modulation(inp.cond_index)
        ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        compiled = self.cfg.compile
        for i, blk in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(blk, x, c, mod, ctx, i, compiled, use_reentrant=False)  # (B, L, H)
            else:
                x = blk(x, c, mod, ctx, i, compiled)  # (B, L, H)
        if cache is not None:
            cache.advance(n_commit, inp.layout)
        # noise prediction at noised (conditioned) tokens only
        flat = x.reshape(B * L, -1)  # (B*L, H)
        if mod.none:  # no noised token: no output from the noise head (nor a graph through it)
            eps = x.new_zeros(B, L, self.cfg.patch_dim)  # (B, L, P)
        elif mod.fast is not None:
            s, e, bs, idx = mod.fast
            xn = x[:, s:e].reshape(B, -1, bs, x.shape[-1])  # (B, nb, bs, H)
            eps_n = self.final_layer(xn, c[idx][:, :, None]).flatten(1, 2)  # (B, e - s, P)
            eps = F.pad(eps_n, (0, 0, s, L - e))  # (B, L, P)
        else:
            cidx = inp.cond_index.reshape(-1)  # (B*L,)
            sel = torch.nonzero(cidx >= 0).flatten()  # (N,)
            eps_sel = self.final_layer(flat[sel], c[cidx[sel]])  # (N, P)
            eps = torch.zeros(B * L, eps_sel.shape[-1], dtype=eps_sel.dtype, device=x.device)
            eps = eps.index_copy(0, sel, eps_sel).view(B, L, -1)  # (B, L, P)
        logits = None
        if logits_at is not None and self.tok_embedder is not None:
            h = flat[torch.nonzero(logits_at.reshape(-1)).flatten()]  # (N_text, H)
            logits = self.lm_head(self.text_norm(h))  # (N_text, V)
        hidden = self.text_norm(x) if (return_hidden and self.tok_embedder is not None) else \
            (self.final_layer.norm_final(x) if return_hidden else None)
        return ModelOutput(eps, logits, hidden)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig) -> ACDiT:
    return ACDiT(cfg)


def imagenet_config(preset: str, **kw) -> ModelConfig:
    """The paper's ImageNet 256 setting: SD-VAE latents 32x32x4, patch 1, 1000 classes."""
    return ModelConfig.preset(preset, latent_channels=4, patch_size=1, num_classes=1000, vocab_size=0,
                              rope_axes=2, rope_split=(1, 1), rope_max_pos=(31, 31), **kw)


def main() -> None:
    """Print the parameter counts of the paper presets in the ImageNet 256 setting."""
    for name in ("ACDiT-B", "ACDiT-L", "ACDiT-XL", "ACDiT-H"):
        with torch.device("meta"):
            m = ACDiT(imagenet_config(name))
        print(f"{name:9s} {count_parameters(m):>13,d}")


if __name__ == "__main__":
    main()
