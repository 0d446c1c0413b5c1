"""The one predicate (DESIGN.md section 2) against a brute-force double loop, and every attention
backend against naive softmax attention."""
import math
import random

import pytest
import torch
from torch.nn.attention import flex_attention as flex_mod
from torch.nn.attention.flex_attention import create_mask

from conftest import random_sample
from unimodal import masks
from unimodal.attention import AttnContext, attend
from unimodal.sequence import PackSpec, pack


def brute_force(doc, step, noisy):
    """DESIGN.md section 2, written out token by token."""
    L = len(doc)
    m = [[False] * L for _ in range(L)]
    for q in range(L):
        for k in range(L):
            if doc[q] == -1:
                m[q][k] = q == k
            elif doc[q] != doc[k]:
                m[q][k] = False
            elif not noisy[k] and not noisy[q]:
                m[q][k] = step[k] <= step[q]
            elif not noisy[k] and noisy[q]:
                m[q][k] = step[k] < step[q]
            elif noisy[k] and noisy[q]:
                m[q][k] = step[k] == step[q] and noisy[k] == noisy[q]  # a guidance copy sees itself only
            else:
                m[q][k] = False
    return torch.tensor(m)


def random_layout(seed: int):
    rng = random.Random(seed)
    samples = [random_sample(rng) for _ in range(rng.randint(1, 4))]
    packed_len = None
    if rng.random() < 0.6:  # several docs per row, padding at the end
        lens = [len(pack([s], PackSpec()).tokens[0]) for s in samples]
        packed_len = max(lens) + sum(lens) // 2 + rng.randint(0, 5)
    lay = pack(samples, PackSpec(), max_len=packed_len).layout
    if seed % 3 == 0:  # guidance copies: noised tokens renumbered 1..3 in runs (a sampling pass's layout)
        runs = torch.randint(1, 4, (lay.shape[0], lay.shape[1] // 2 + 1), generator=torch.Generator().manual_seed(seed))
        copy = runs.repeat_interleave(2, 1)[:, :lay.shape[1]]
        lay = masks.Layout(lay.doc, lay.step, lay.noisy * copy)
    return lay


@pytest.mark.parametrize("chunk", range(4))
def test_dense_and_flex_masks_equal_brute_force(chunk):
    for seed in range(chunk * 60, chunk * 60 + 60):  # 240 random layouts
        lay = random_layout(seed)
        B, L = lay.shape
        dense = masks.dense_mask(lay)
        flex = create_mask(masks.mask_mod(lay), B, 1, L, L, device="cpu")[:, 0]
        for b in range(B):
            ref = brute_force(lay.doc[b].tolist(), lay.step[b].tolist(), lay.noisy[b].tolist())
            assert torch.equal(dense[b], ref), f"layout {seed} row {b}"
            assert torch.equal(flex[b], ref), f"layout {seed} row {b} (flex)"
        assert lay.doc.min() >= -1


def naive_attention(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention refuses backward on CPU on purpose; the eager path computes it correctly
    (see shared/notes/flex-attention-cpu.md), so tests lift the refusal to check the training path."""
    monkeypatch.setattr(flex_mod, "_validate_device", lambda *a, **k: None)


@pytest.mark.parametrize("backend", ["sdpa", "block", "flex"])
def test_backends_match_naive_attention(backend, flex_backward_on_cpu):
    for seed in range(0, 200, 10):
        lay = random_layout(seed)
        B, L = lay.shape
        H, D = 2, 16
        q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
        ref_mask = torch.stack([brute_force(lay.doc[b].tolist(), lay.step[b].tolist(), lay.noisy[b].tolist())
                                for b in range(B)])[:, None]
        ref = naive_attention(q, k, v, ref_mask)
        ctx = AttnContext(lay, None, None, backend)
        out = attend(q, k, v, ctx)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(out)
        gq, gk, gv = torch.autograd.grad((out * g).sum(), (q, k, v))
        rq, rk, rv = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, r in ((gq, rq), (gk, rk), (gv, rv)):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def kernel_sized_layout(seed: int):
    """Rows of 1-3 documents of text, images with blocks of 16 or 64 tokens (sizes the fused kernel takes)
    and videos, padded at the end; half with the dead last clean block dropped."""
    from unimodal.sequence import Image, Sample, Text, Video
    rng = random.Random(seed)
    samples = []
    for _ in range(rng.randint(1, 3)):
        segs = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["text", "image", "video"])
            if kind == "text":
                segs.append(Text(torch.arange(rng.choice([3, 16, 20]))))
            elif kind == "image":
                grid = rng.choice([4, 8, 16])
                block = rng.choice([b for b in (16, 64) if b <= grid * grid] + [None])
                segs.append(Image(torch.randn(1, grid, grid), block=block))
            else:
                segs.append(Video(torch.randn(2, 1, 4, 4), frames_per_block=rng.choice([1, 2])))
        samples.append(Sample(segs))
    spec = PackSpec(drop_dead_clean=seed % 2 == 0)
    lens = [len(pack([s], spec).tokens[0]) for s in samples]
    return pack(samples, spec, max_len=max(lens) + sum(lens) // 2 + rng.choice([0, 1, 16, 33])).layout


@pytest.mark.parametrize("backend", ["sdpa", "block", "flex"])
def test_backends_match_naive_attention_on_kernel_sized_blocks(backend, flex_backward_on_cpu, monkeypatch):
    """Several documents per row, padding, dropped dead blocks, head dim 32: the block path's fused
    kernel runs on these layouts (the groups above use blocks too small for it)."""
    from unimodal import block_kernel
    calls = []
    forward = block_kernel.forward
    monkeypatch.setattr(block_kernel, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    multi = 0
    for seed in range(12):
        lay = kernel_sized_layout(seed)
        B, L = lay.shape
        multi += int((lay.doc.amax(1) >= 1).sum())  # rows holding several documents
        q, k, v = (torch.randn(B, 2, L, 32, requires_grad=True) for _ in range(3))
        ref_mask = torch.stack([brute_force(lay.doc[b].tolist(), lay.step[b].tolist(), lay.noisy[b].tolist())
                                for b in range(B)])[:, None]
        ref = naive_attention(q, k, v, ref_mask)
        out = attend(q, k, v, AttnContext(lay, None, None, backend))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(out)
        grads, refs = (torch.autograd.grad((x * g).sum(), (q, k, v)) for x in (out, ref))
        for a, r in zip(grads, refs):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert multi >= 4 and (len(calls) > 0) == (backend == "block" and block_kernel.available())


def test_backend_dispatch_replaces_what_cannot_run_with_a_warning():
    """A requested backend runs where it can; where it cannot (flex training on CPU, flash without CUDA and
    flash-attn, block or flex for a cached pass on CUDA), the pass takes auto's choice and says so once."""
    from unimodal import attention as A
    from unimodal.config import ModelConfig
    lay = kernel_sized_layout(1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto_train = A.choose_backend("auto", lay, cpu, True, False)
    A._REPLACED.clear()
    with pytest.warns(UserWarning, match="'flex': FlexAttention has no backward on CPU"):
        assert A.choose_backend("flex", lay, cpu, True, False) == auto_train
    with torch.no_grad():
        assert A.choose_backend("flex", lay, cpu, True, False) == "flex"  # no gradient: flex runs forward
    assert A.choose_backend("flex", lay, cpu, False, False) == "flex"
    if not A._has_flash():
        with pytest.warns(UserWarning, match="'flash': needs CUDA and the flash-attn package"):
            assert A.choose_backend("flash", lay, cpu, False, True) == "block"
    assert A.choose_backend("flash", lay, cpu, True, False) == auto_train  # flash: cached passes only
    with pytest.warns(UserWarning, match="'block': has no cached-pass path on cuda"):
        assert A.choose_backend("block", lay, cuda, False, True) == ("flash" if A._has_flash() else "sdpa")
    with pytest.warns(UserWarning, match="'flex': has no cached-pass path on cpu"):
        assert A.choose_backend("flex", lay, cpu, False, True) == "block"
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        ModelConfig(attn_backend="naive")


@pytest.mark.parametrize("backend", ["sdpa", "block"])
def test_backends_in_bf16_match_naive_attention(backend):
    """bf16 inputs (the autocast path): the block path's forward runs the kernel in bf16 and its
    backward (these layouts' groups are small) in fp32; both stay within bf16 rounding of fp32
    naive attention."""
    for seed in range(0, 200, 20):
        lay = random_layout(seed)
        B, L = lay.shape
        q, k, v = (torch.randn(B, 2, L, 16).bfloat16().requires_grad_() for _ in range(3))
        ref_mask = torch.stack([brute_force(lay.doc[b].tolist(), lay.step[b].tolist(), lay.noisy[b].tolist())
                                for b in range(B)])[:, None]
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = naive_attention(qf, kf, vf, ref_mask)
        out = attend(q, k, v, AttnContext(lay, None, None, backend))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
        refs = torch.autograd.grad((ref * g).sum(), (qf, kf, vf))
        for a, r in zip(grads, refs):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), r, atol=5e-2, rtol=5e-2)


def test_dense_path_attends_in_fp32_under_autocast():
    """CPU autocast lists SDPA among its bf16 ops: the dense-mask path, which attends reduced-precision
    inputs in fp32, must come out as fp32 SDPA on the widened inputs (forward and gradients), not as
    bf16 SDPA."""
    lay = random_layout(3)
    B, L = lay.shape
    q, k, v = (torch.randn(B, 2, L, 16).bfloat16().requires_grad_() for _ in range(3))
    mask = AttnContext(lay, None, None, "sdpa").dense()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    low = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    assert not torch.equal(low, ref.bfloat16())  # the two paths are told apart by these inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, AttnContext(lay, None, None, "sdpa"))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)
    g = torch.randn(ref.shape).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (qf, kf, vf), g.float())
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r.bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize("block", [64, 256])
def test_block_path_in_bf16_matches_naive_attention_on_both_backward_kernels(block, monkeypatch):
    """One 32x32 image in blocks of `block` tokens through ATen's kernels (the own kernel, which would
    take these groups, switched off): groups under LOW_BWD_MIN_QUERIES queries take the fp32 backward
    kernel, larger ones the bf16 kernel; both within bf16 rounding of fp32 naive."""
    from unimodal import block_kernel
    from unimodal.attention import LOW_BWD_MIN_QUERIES
    monkeypatch.setattr(block_kernel, "supports", lambda q: False)
    from unimodal.sequence import Image, Sample
    lay = pack([Sample([Image(torch.randn(1, 32, 32), block=block)])], PackSpec()).layout
    sizes = {g.q1 - g.q0 for g in masks.query_groups(lay)}
    assert (max(sizes) >= LOW_BWD_MIN_QUERIES) == (block >= LOW_BWD_MIN_QUERIES)
    g = torch.Generator().manual_seed(block)
    q, k, v = (torch.randn(1, 2, lay.shape[1], 32, generator=g).bfloat16().requires_grad_() for _ in range(3))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = naive_attention(qf, kf, vf, masks.dense_mask(lay)[:, None])
    out = attend(q, k, v, AttnContext(lay, None, None, "block"))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    dout = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((out.float() * dout).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * dout).sum(), (qf, kf, vf))
    for a, r in zip(grads, refs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), r, atol=5e-2, rtol=5e-2)


def test_block_path_skips_the_empty_part_of_scam():
    """16 blocks of 64 tokens: the block path's groups see only allowed keys, unmasked."""
    from unimodal.sequence import Image, Sample
    lay = pack([Sample([Image(torch.randn(1, 32, 32), block=64)])], PackSpec()).layout  # 16 blocks of 8x8
    groups = masks.query_groups(lay)
    computed = sum((g.q1 - g.q0) * sum(e - s for s, e in g.k_ranges) for g in groups)
    allowed = int(masks.dense_mask(lay).sum())
    assert computed == allowed
    assert all(g.mask is None for g in groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padding_run_is_one_group_on_the_block_path(dtype):
    """A row padded by 200 tokens: the padding is one group whatever its length (no call or Python
    step per padding token), `auto` keeps the block path, and forward and gradients match naive
    attention under the brute-force mask (padding sees only itself)."""
    from unimodal.attention import choose_backend
    from unimodal.sequence import Image, Sample
    sample = Sample([Image(torch.randn(1, 16, 16), block=64)], label=1)
    n = len(pack([sample], PackSpec()).tokens[0])
    lay = pack([sample], PackSpec(), max_len=n + 200).layout
    assert int((lay.doc[0] < 0).sum()) == 200
    groups = masks.query_groups(lay)
    pads = [g for g in groups if lay.doc[0, g.q0] < 0]
    assert [(g.q0, g.q1, g.k_ranges) for g in pads] == [(n, n + 200, ())]
    assert choose_backend("auto", lay, torch.device("cpu"), True, False) == "block"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n + 200, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_mask = brute_force(lay.doc[0].tolist(), lay.step[0].tolist(), lay.noisy[0].tolist())[None, None]
    ref = naive_attention(qf, kf, vf, ref_mask)
    out = attend(q, k, v, AttnContext(lay, None, None, "block"))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * dout).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * dout).sum(), (qf, kf, vf))
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a.double(), r, atol=5 * tol, rtol=5 * tol)
