"""The ACDiT model: causality through all layers, B = L is plain DiT, paper parameter counts,
and a tiny model overfitting one mixed batch."""
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import random_sample
from test_masks import brute_force
from unimodal.config import ModelConfig
from unimodal.diffusion import LossConfig, model_input, train_scheduler, training_loss
from unimodal.model import ACDiT, count_parameters, imagenet_config
from unimodal.sequence import Image, PackSpec, Sample, Text, Video, pack

BACKENDS = ["sdpa", "block", "flex"]


def test_paper_rope_is_the_design_notes_rotation():
    """RoPE-ND "paper" style written out from DESIGN.md section 3: head_dim 64 split 2:3:3 into 16, 24, 24
    dims; axis j's base 100 ceil(8 L_j / (100 pi)) (L = 40, 7, 9 -> 200, 100, 100) and inv_freq
    base^(-2k/d_j); dims (i, i + 32) rotated as the complex number x_i + i x_{i+32} times e^(i theta_i), the
    first 8 pairs by axis 0's angles, the next 12 by axis 1's, the last 12 by axis 2's."""
    from unimodal.attention import RopeND, apply_rope
    rope = RopeND(64, (2, 3, 3), (40, 7, 9))
    g = torch.Generator().manual_seed(0)
    pos = torch.stack([torch.randint(0, 41, (1, 10), generator=g), torch.randint(0, 8, (1, 10), generator=g),
                       torch.randint(0, 10, (1, 10), generator=g)], -1)  # (1, L, 3)
    theta = []
    for axis, (d, base) in enumerate(((16, 200), (24, 100), (24, 100))):
        inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        theta.append(pos[0, :, axis, None].double() * inv)  # (L, d/2)
    theta = torch.cat(theta, -1)  # (L, 32)
    x = torch.randn(1, 2, 10, 64, dtype=torch.float64, generator=g)  # (B, heads, L, D)
    z = torch.complex(x[..., :32], x[..., 32:]) * torch.polar(torch.ones_like(theta), theta)  # (B, heads, L, 32)
    want = torch.cat([z.real, z.imag], -1)
    got = apply_rope(x, *rope.tables(pos))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    # scores depend on the offset along each axis only: a common shift leaves them, a shift of one axis does not
    q, k = torch.randn(2, 1, 1, 10, 64, dtype=torch.float64, generator=g)
    def scores(pq, pk):
        return (apply_rope(q, *rope.tables(pq)) * apply_rope(k, *rope.tables(pk))).sum(-1)  # (1, 1, L)
    base = scores(pos, pos.roll(1, 1))
    torch.testing.assert_close(scores(pos + torch.tensor([5, 3, 2]), pos.roll(1, 1) + torch.tensor([5, 3, 2])), base,
                               atol=1e-5, rtol=1e-5)
    for axis in range(3):
        moved = pos.roll(1, 1).clone()
        moved[..., axis] += 1
        assert float((scores(pos, moved) - base).abs().max()) > 1e-3, axis


def randomised(model: ACDiT) -> ACDiT:
    """Give every parameter (zero-initialised adaLN and output layers too) a random value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny(backend="sdpa", **kw) -> ACDiT:
    cfg = ModelConfig.preset("ACDiT-Micro", latent_channels=2, patch_size=1, vocab_size=50, num_classes=10,
                             attn_backend=backend, **kw)
    return ACDiT(cfg).double()


def forward_all(model, packed, patches, tokens):
    t = torch.arange(packed.n_blocks) * 37 % 1000
    y = torch.where(packed.block_label < 0, torch.full_like(packed.block_label, 10), packed.block_label)
    p = packed
    inp = model_input(p, patches, t, y)
    inp.tokens = tokens
    with torch.no_grad():
        out = model(inp, return_hidden=True)
    return out.hidden  # (B, L, H): every token's final state


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbing_a_token_changes_exactly_what_may_see_it(backend):
    model = randomised(tiny(backend))
    for seed in range(6 if backend != "flex" else 2):  # eager flex materialises scores: slow
        rng = random.Random(100 + seed)
        packed = pack([random_sample(rng) for _ in range(2)], PackSpec(latent_channels=2), max_len=None)
        packed.patches = packed.patches.double()
        base = forward_all(model, packed, packed.patches, packed.tokens)
        B, L = packed.tokens.shape
        for b in range(B):
            may_see = brute_force(packed.doc[b].tolist(), packed.step[b].tolist(), packed.noisy[b].tolist())
            for j in range(L):
                if packed.doc[b, j] < 0:
                    continue
                patches, tokens = packed.patches.clone(), packed.tokens.clone()
                if packed.kind[b, j] == 1:
                    tokens[b, j] = (tokens[b, j] + 7) % 50
                else:
                    patches[b, j] += torch.randn_like(patches[b, j])
                out = forward_all(model, packed, patches, tokens)
                changed = (out - base).abs().amax(-1) > 1e-9  # (B, L)
                assert not changed[1 - b].any() if B > 1 else True
                expect = may_see[:, j]
                assert torch.equal(changed[b], expect), (
                    f"layout seed {seed} row {b}: perturbing token {j} (step {int(packed.step[b, j])}, "
                    f"noisy {int(packed.noisy[b, j])}) changed {changed[b].nonzero().flatten().tolist()}, "
                    f"expected {expect.nonzero().flatten().tolist()}")


def plain_dit(model: ACDiT, x_noised, t, y, grid):
    """Independent DiT forward: noised tokens only, full bidirectional attention, no mask."""
    cfg = model.cfg
    h = model.x_embedder(x_noised)  # (N, L, H)
    c = model.t_embedder(model.t_proj(t.float()).to(h.dtype)) + model.y_embedder(y)  # (N, H)
    L = h.shape[1]
    hh, ww = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([torch.zeros(L, dtype=torch.long), hh.flatten(), ww.flatten()], -1)[None]
    cos, sin = model.rope.cos_sin(pos)
    rot = lambda u: torch.cat([-u[..., u.shape[-1] // 2:], u[..., :u.shape[-1] // 2]], -1)
    for blk in model.blocks:
        s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c)[:, None].chunk(6, -1)
        a = blk.norm1(h) * (1 + sc1) + s1
        q, k, v = blk.attn.qkv(a).view(1, L, 3, cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, L, -1)
        h = h + g1 * blk.attn.proj(o)
        h = h + g2 * blk.mlp(blk.norm2(h) * (1 + sc2) + s2)
    sh, sc = model.final_layer.adaLN_modulation(c)[:, None].chunk(2, -1)
    return model.final_layer.linear(model.final_layer.norm_final(h) * (1 + sc) + sh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_block_per_image_is_plain_dit(backend):
    model = randomised(tiny(backend))
    img = torch.randn(2, 4, 4, dtype=torch.float64)
    packed = pack([Sample([Image(img, block=None)], label=3)], PackSpec())
    noised = torch.randn(1, 16, 2, dtype=torch.float64)
    patches = packed.patches.double().clone()
    patches[packed.noisy.bool()] = noised[0]
    t, y = torch.tensor([421]), torch.tensor([3])
    with torch.no_grad():
        out = model(model_input(packed, patches, t, y)).eps[packed.noisy.bool()]
        ref = plain_dit(model, noised, t, y, grid=4)[0]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


PAPER_COUNTS = {"ACDiT-B": 130_305_028, "ACDiT-L": 457_851_908, "ACDiT-XL": 674_856_708, "ACDiT-H": 950_959_620}


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_parameter_counts_equal_the_reference(name):
    with torch.device("meta"):
        m = ACDiT(imagenet_config(name))
    assert count_parameters(m) == PAPER_COUNTS[name]


def test_parameter_count_command_prints_them():
    out = subprocess.run([sys.executable, "-m", "unimodal.model"], capture_output=True, text=True, check=True).stdout
    for name, n in PAPER_COUNTS.items():
        assert f"{n:,d}" in out and name in out


def test_tiny_model_overfits_a_fixed_mixed_batch():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("ACDiT-Mini", latent_channels=2, patch_size=2, vocab_size=64, num_classes=10)
    model = ACDiT(cfg)
    g = torch.Generator().manual_seed(0)
    sample = Sample([Text(torch.randint(0, 64, (12,), generator=g)),
                     Image(torch.randn(2, 8, 8, generator=g), block=4),
                     Video(torch.randn(4, 2, 4, 4, generator=g), frames_per_block=2),
                     Text(torch.randint(0, 64, (8,), generator=g))], label=5)
    packed = pack([sample], PackSpec(patch_size=2))
    sched = train_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    t = torch.randint(0, 1000, (packed.n_blocks,), generator=g)
    lc = LossConfig(class_dropout=0.0)
    first = last = None
    for it in range(300):
        loss, parts = training_loss(model, packed, sched, lc, torch.Generator().manual_seed(1), t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 0:
            first = {k: float(v) for k, v in parts.items()}
        last = {k: float(v) for k, v in parts.items()}
    assert set(first) == {"text", "image"}
    for k in first:
        assert last[k] < first[k] / 10, f"{k} loss {first[k]:.4f} -> {last[k]:.4f}"


def test_dropping_dead_clean_blocks_changes_no_prediction():
    model = randomised(tiny("sdpa"))
    s = Sample([Text(torch.tensor([1, 2, 3])), Image(torch.randn(2, 4, 4, dtype=torch.float64), block=4)], label=2)
    outs = []
    for drop in (False, True):
        pk = pack([s], PackSpec(drop_dead_clean=drop))
        t = torch.arange(pk.n_blocks) * 97
        with torch.no_grad():
            eps = model(model_input(pk, pk.patches.double(), t, torch.full_like(t, 2))).eps
        outs.append(eps[pk.noisy.bool()])
    assert outs[0].shape == outs[1].shape
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-12)


def test_block_broadcast_modulation_equals_per_token_lookup(monkeypatch):
    """The per-block broadcast fast path computes what the per-token table lookup computes."""
    from unimodal import model as M
    model = randomised(tiny("sdpa"))
    samples = [Sample([Image(torch.randn(2, 4, 4, dtype=torch.float64), block=4)], label=i) for i in range(3)]
    pk = pack(samples, PackSpec())
    assert M.Modulation(model_input(pk, pk.patches, torch.zeros(pk.n_blocks), pk.block_label).cond_index).fast
    t = torch.arange(pk.n_blocks) * 61
    x = pk.patches.double().requires_grad_()
    outs = []
    for plan in (M.Modulation._plan, lambda ci: None):
        monkeypatch.setattr(M.Modulation, "_plan", staticmethod(plan))
        eps = model(model_input(pk, x, t, pk.block_label)).eps
        g, = torch.autograd.grad(eps.square().sum(), x)
        outs.append((eps.detach(), g))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-12, rtol=1e-12)


def test_text_only_passes_skip_modulation(monkeypatch):
    """Without conditioned tokens nothing is modulated: logits and gradients equal the per-token lookup's
    (identity rows), whose adaLN gradients are zero where the skipping pass leaves them out."""
    from unimodal import model as M
    model = randomised(tiny("sdpa"))
    g = torch.Generator().manual_seed(3)
    samples = [Sample([Text(torch.randint(0, 50, (n,), generator=g))]) for n in (9, 14)]
    pk = pack(samples, PackSpec(latent_channels=model.cfg.latent_channels))
    inp = model_input(pk, pk.patches.double(), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert M.Modulation(inp.cond_index).none
    init = M.Modulation.__init__
    results = []
    for skip in (True, False):
        def patched(self, ci, skip=skip):
            init(self, ci)
            self.none = self.none and skip
        monkeypatch.setattr(M.Modulation, "__init__", patched)
        model.zero_grad(set_to_none=True)
        logits = model(inp, logits_at=inp.is_text & (pk.doc >= 0)).logits
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    skipped = [n for n, v in ga.items() if v is None]
    assert skipped and all("adaLN_modulation" in n or n.split(".")[0] in ("final_layer", "t_embedder", "y_embedder")
                           for n in skipped)  # the conditioning path only
    for n in ga:
        if ga[n] is None:
            assert gb[n] is None or not bool(gb[n].any()), n
        else:
            torch.testing.assert_close(ga[n], gb[n], atol=1e-12, rtol=1e-12, msg=n)


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_min_snr_loss_equals_a_per_block_loop(gamma):
    """The image loss, plain or Min-SNR-gamma weighted, recomputed block by block from the
    scheduler's alphas_cumprod: w = min(SNR, gamma) / SNR with SNR = abar / (1 - abar)."""
    model = randomised(tiny("sdpa")).float()
    s = [Sample([Image(torch.randn(2, 4, 4), block=4)], label=i) for i in range(3)]
    packed = pack(s, PackSpec())
    sched = train_scheduler()
    t = torch.tensor([3, 40, 200, 500, 999, 10, 700, 1, 250, 600, 80, 900])[:packed.n_blocks]
    g = torch.Generator().manual_seed(0)
    from unimodal.diffusion import draw, noise_blocks
    d = draw(packed, 1000, 0.0, g)
    loss, parts = training_loss(model, packed, sched, LossConfig(class_dropout=0.0, snr_gamma=gamma), draws=d, t=t)
    with torch.no_grad():
        y = packed.block_label.clone()
        eps_hat = model(model_input(packed, noise_blocks(packed, sched, t, d.eps), t, y)).eps
    num, den = 0.0, 0
    for r in range(packed.noisy.shape[0]):
        for i in range(packed.noisy.shape[1]):
            if packed.noisy[r, i]:
                b = int(packed.block_id[r, i])
                abar = float(sched.alphas_cumprod[t[b]])
                snr = abar / (1 - abar)
                w = min(snr, gamma) / snr if gamma > 0 else 1.0
                num += w * float(((eps_hat[r, i] - d.eps[r, i]) ** 2).mean())
                den += 1
    assert abs(float(parts["image"]) - num / den) < 1e-5 * max(1.0, num / den)
    if gamma > 0:  # the weights really differ from 1 on these timesteps
        assert abs(float(parts["image"]) - float(F.mse_loss(eps_hat[packed.noisy.bool()], d.eps[packed.noisy.bool()]))) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_gelu_is_torchs_tanh_gelu(dtype):
    """Under torch.compile the MLP's GELU takes the sigmoid form of the tanh approximation: the values and
    gradients of F.gelu(approximate="tanh") in fp64, up to the dtype's rounding, over the range activations
    take."""
    from unimodal.model import gelu
    x = torch.linspace(-12, 12, 4099).to(dtype).requires_grad_()
    g = torch.randn(4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = torch.compile(lambda t: gelu(t, "tanh"), dynamic=False)(x)
    x64 = x.detach().double().requires_grad_()
    ref = F.gelu(x64, approximate="tanh")
    tol = dict(atol=2e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.double(), ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0].double(),
                               torch.autograd.grad(ref, x64, g.double())[0], **{**tol, "atol": 5 * tol["atol"]})


@pytest.mark.parametrize("backend", ["sdpa", "block"])
def test_compiled_block_regions_match_eager(backend):
    """model.compile=True (Inductor-fused norms, modulation, RoPE, MLP) computes the eager
    model's training loss and parameter gradients on a mixed text + image + video batch."""
    torch.manual_seed(0)
    samples = [Sample([Text(torch.tensor([1, 2, 3])), Image(torch.randn(2, 4, 4), block=4)], label=2),
               Sample([Video(torch.randn(2, 2, 4, 4), frames_per_block=1)], label=5)]
    results = []
    for compile_ in (False, True):
        cfg = ModelConfig.preset("ACDiT-Micro", latent_channels=2, patch_size=1, vocab_size=50, num_classes=10,
                                 attn_backend=backend, compile=compile_)
        torch.manual_seed(1)
        model = randomised(ACDiT(cfg).float()).train()
        pk = pack(samples, PackSpec())
        loss, _ = training_loss(model, pk, train_scheduler(), LossConfig(), torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(ACDiT(cfg).named_parameters(), results[1][1], results[0][1]):
        if b is None:
            assert a is None, name
            continue
        scale = float(b.abs().max()) + 1e-12  # fp32 sums reassociated by the fused kernels
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _loss_and_grads(backend, **cfg_kw):
    """A mixed text + image + video training loss of ACDiT-Micro and its parameter gradients."""
    torch.manual_seed(0)
    samples = [Sample([Text(torch.tensor([1, 2, 3])), Image(torch.randn(2, 8, 8), block=16)], label=2),
               Sample([Video(torch.randn(4, 2, 4, 4), frames_per_block=2)], label=5)]
    cfg = ModelConfig.preset("ACDiT-Micro", latent_channels=2, patch_size=1, vocab_size=50, num_classes=10,
                             attn_backend=backend, **cfg_kw)
    torch.manual_seed(1)
    model = randomised(ACDiT(cfg).float()).train()
    loss, _ = training_loss(model, pack(samples, PackSpec()), train_scheduler(), LossConfig(),
                            torch.Generator().manual_seed(3))
    return model, loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("backend", ["sdpa", "block"])
def test_a_bf16_autocast_training_step_tracks_fp32(backend):
    """The default compute path (bf16 autocast over fp32 weights): its loss and gradients are those of
    fp32 to bf16's precision (the 200-step loss comparison is the slow test's)."""
    _, ref, ref_g = _loss_and_grads(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model, loss, grads = _loss_and_grads(backend)
    assert loss.dtype == torch.float32 and abs(float(loss) / float(ref) - 1) < 2e-2, (float(loss), float(ref))
    assert float(loss) != float(ref)  # autocast did run the products in bf16
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    flat_ref = torch.cat([g.flatten() for g in ref_g if g is not None])
    assert float(F.cosine_similarity(flat, flat_ref, dim=0)) > 0.995
    for (name, p), g, r in zip(model.named_parameters(), grads, ref_g):
        assert (g is None) == (r is None), name
        if r is not None and float(r.norm()) > 1e-3 * float(flat_ref.norm()):
            assert g.dtype == p.dtype == torch.float32, name  # fp32 master weights and gradients
            assert float(F.cosine_similarity(g.flatten(), r.flatten(), dim=0)) > 0.97, name


@pytest.mark.parametrize("backend", ["sdpa", "block"])
def test_gradient_checkpointing_changes_no_loss_or_gradient(backend, monkeypatch):
    import unimodal.model as M
    model, ref, ref_g = _loss_and_grads(backend)
    calls = []
    real = M.checkpoint
    monkeypatch.setattr(M, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, loss, grads = _loss_and_grads(backend, gradient_checkpointing=True)
    assert len(calls) == model.cfg.depth  # every block recomputed in the backward
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_g):
        assert (g is None) == (r is None), name
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-6 * (float(r.abs().max()) + 1e-12), rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
