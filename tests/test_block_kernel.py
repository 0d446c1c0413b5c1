"""The fused CPU block-attention kernel (unimodal/csrc/block_attention.cpp) against fp64 naive
softmax attention and against ATen's kernels on the same groups, forward and backward; its bf16 AMX path
on software-emulated tiles where the CPU has no AMX."""
import math
import os
import shutil
import subprocess

import pytest
import torch

from unimodal import attention, block_kernel, masks
from unimodal.attention import AttnContext, attend
from unimodal.sequence import Image, PackSpec, Sample, Text, Video, pack

pytestmark = pytest.mark.skipif(not block_kernel.available(), reason=f"no block kernel here: "
                                f"{block_kernel.unavailable_reason()}")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def layouts():
    g = torch.Generator().manual_seed(0)
    one = [Sample([Image(torch.randn(1, 32, 32, generator=g), block=64)])]  # 16 blocks of 64
    small = [Sample([Image(torch.randn(1, 16, 16, generator=g), block=16)])]  # 16 blocks of 16
    big = [Sample([Image(torch.randn(1, 32, 32, generator=g), block=256)])]  # 4 blocks of 256
    rect = [Sample([Image(torch.randn(1, 16, 32, generator=g), block=(4, 8))])]  # 16 blocks of 32
    video = [Sample([Video(torch.randn(4, 1, 8, 8, generator=g), frames_per_block=1)])]  # 4 blocks of 64
    docs = [Sample([Image(torch.randn(1, 16, 16, generator=g), block=64)]),  # two documents in one row
            Sample([Image(torch.randn(1, 8, 16, generator=g), block=(4, 8))])]
    mixed = [Sample([Text(torch.arange(16)), Image(torch.randn(1, 16, 16, generator=g), block=64)], label=1)]
    odd = [Sample([Image(torch.randn(1, 12, 16, generator=g), block=(6, 8))])]  # 4 blocks of 48: K = 32 + 16
    return {"16x64": one, "16x16": small, "4x256": big, "rect": rect, "video": video, "two-docs": docs,
            "text+image": mixed, "4x48": odd}


LAYOUTS = layouts()


def naive(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()  # (B, H, L, D)


def qkv(B, H, L, D, dtype, seed):
    """q, k, v as the model makes them: strided views of one fused projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 3, H, D, generator=g).to(dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
    return [t.detach().requires_grad_() for t in x.unbind(0)]


def run(q, k, v, lay, dout):
    out = attend(q, k, v, AttnContext(lay, None, None, "block"))
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


AVX512 = block_kernel.NATIVE <= block_kernel._cpu_flags()
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the AMX path is part of the AVX-512 build, which this "
                                                     "CPU cannot run")


@pytest.fixture(scope="module")
def amx_emulated():
    """The kernel built with its AMX tiles emulated in software (csrc/amx_emulated.h)."""
    if not AVX512:
        pytest.skip(needs_avx512.kwargs["reason"])
    lib = block_kernel.build(emulate_amx=True)
    assert lib.amx, "the emulated build runs its bf16 products on tiles"
    return lib


@pytest.mark.parametrize("dtype,build", [(torch.float32, "native"), (torch.bfloat16, "native"),
                                         (torch.bfloat16, "amx-emulated")], ids=["fp32", "bf16", "bf16-amx-emulated"])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("keep", [True, False], ids=["kept-probs", "recomputed-probs"])
def test_kernel_matches_naive_attention_and_aten(name, dtype, build, D, keep, monkeypatch, request):
    if build == "amx-emulated":
        monkeypatch.setattr(block_kernel, "_lib", request.getfixturevalue("amx_emulated"))
    monkeypatch.setattr(attention, "KEEP_PROBS_MIB", 1024 if keep else 0)
    lay = pack(LAYOUTS[name], PackSpec()).layout
    B, L, H = lay.shape[0], lay.shape[1], 2
    groups = attention.block_groups(lay.row(0))
    fused, rest = attention._kernel_split(torch.empty(1, 1, 1, D, dtype=dtype), groups)
    assert fused, "the kernel must take some groups of this layout"
    # text runs are masked groups, which ATen's kernels take; the kernel takes every image block,
    # 16-token ones included
    assert (name == "text+image") == bool(rest), [(g.q0, g.q1) for g in rest]
    q, k, v = qkv(B, H, L, D, dtype, seed=D)
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = run(q, k, v, lay, dout)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive(qd, kd, vd, masks.dense_mask(lay)[:, None])
    refs = (ref, *torch.autograd.grad(ref, (qd, kd, vd), dout.double()))
    monkeypatch.setattr(block_kernel, "supports", lambda q: False)  # the same groups through ATen's kernels
    aten = run(q, k, v, lay, dout)
    for name_, a, r, t in zip(("out", "dq", "dk", "dv"), got, refs, aten):
        assert a.dtype == dtype, name_
        tol = TOL[dtype] if name_ == "out" else GRAD_TOL[dtype]
        torch.testing.assert_close(a.double(), r, **tol, msg=lambda m: f"{name_} vs naive: {m}")
        if dtype == torch.bfloat16:  # no worse than ATen's bf16 kernels, up to rounding noise
            err, err_aten = (a.double() - r).abs().mean(), (t.double() - r).abs().mean()
            assert err <= 1.5 * err_aten + 1e-4, (name_, float(err), float(err_aten))


@pytest.mark.parametrize("block", [16, 4])
def test_auto_backend_counts_only_the_groups_atens_kernels_take(block):
    """64 blocks of 16 tokens: 128 query groups, all taken by the kernel in one call, so "auto" keeps the
    block path; 256 blocks of 4 tokens: hundreds of masked groups, a call each, so dense SDPA."""
    lay = pack([Sample([Image(torch.randn(1, 32, 32), block=block)])], PackSpec()).layout
    groups = attention.block_groups(lay.row(0))
    aten = [g for g in groups if not block_kernel.takes(g)]
    assert len(groups) > attention.MAX_BLOCK_GROUPS
    assert (len(aten) > attention.MAX_BLOCK_GROUPS) == (block == 4)
    got = attention.choose_backend("auto", lay, torch.device("cpu"), training=True, cached=False)
    assert got == ("sdpa" if block == 4 else "block")


def test_probabilities_are_kept_for_training_only_and_within_the_memory_limit(monkeypatch):
    """The forward keeps the probabilities (one per allowed pair) when gradients will be taken and the
    probabilities held by live graphs stay within KEEP_PROBS_MIB; not under no_grad, not for inputs
    without grad, not past the limit."""
    lay = pack(LAYOUTS["16x64"], PackSpec()).layout
    B, L, H, D = lay.shape[0], lay.shape[1], 2, 64
    seen = []
    real = block_kernel.forward

    def spy(q, k, v, out, groups, probs=None):
        seen.append(None if probs is None else probs.numel())
        return real(q, k, v, out, groups, probs)
    monkeypatch.setattr(block_kernel, "forward", spy)
    q, k, v = qkv(B, H, L, D, torch.bfloat16, seed=0)
    allowed = int(masks.dense_mask(lay).sum()) * H
    kept = allowed + 2 * B * H * L  # bf16 probabilities, and an fp32 normaliser per query
    ctx = lambda: AttnContext(lay, None, None, "block")  # noqa: E731
    attend(q, k, v, ctx())
    with torch.no_grad():
        attend(q, k, v, ctx())
    attend(q.detach(), k.detach(), v.detach(), ctx())
    assert kept * 2 > 2 * 2 ** 20  # bf16 probabilities over 2 MiB: a limit 1 MiB under them refuses them
    monkeypatch.setattr(attention, "KEEP_PROBS_MIB", kept * 2 // 2 ** 20 - 1)
    attend(q, k, v, ctx())
    monkeypatch.setattr(attention, "KEEP_PROBS_MIB", kept * 3 // 2 ** 20)  # room for one call's, not two
    held = attend(q, k, v, ctx())  # its graph holds its probabilities
    attend(q, k, v, ctx())
    del held
    attend(q, k, v, ctx())
    assert seen == [kept, None, None, None, kept, None, kept]


def test_kept_probabilities_are_checked():
    lay = pack(LAYOUTS["16x64"], PackSpec()).layout
    groups = masks.query_groups(lay.row(0))
    q, k, v = (t.detach() for t in qkv(1, 2, lay.shape[1], 64, torch.bfloat16, seed=0))
    n = block_kernel.probs_numel(1, 2, groups, torch.bfloat16)
    for bad in (torch.empty(n - 1, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float32),
                torch.empty(n + 1, dtype=torch.bfloat16)[1:]):  # short, wrong dtype, off a 64-byte boundary
        with pytest.raises(ValueError, match="probs"):
            block_kernel.forward(q, k, v, torch.empty_like(q), groups, bad)


def test_probability_buffers_are_reused_only_once_their_graph_is_freed(monkeypatch):
    lay = pack(LAYOUTS["16x64"], PackSpec()).layout
    B, L, H, D = lay.shape[0], lay.shape[1], 2, 64
    ptrs = []
    real = block_kernel.forward

    def spy(q, k, v, out, groups, probs=None):
        ptrs.append(probs.data_ptr())
        return real(q, k, v, out, groups, probs)
    monkeypatch.setattr(block_kernel, "forward", spy)
    monkeypatch.setattr(attention, "_POOL", {})
    q, k, v = qkv(B, H, L, D, torch.bfloat16, seed=0)
    ctx = lambda: AttnContext(lay, None, None, "block")  # noqa: E731
    first, second = attend(q, k, v, ctx()), attend(q, k, v, ctx())  # two graphs alive: two buffers
    assert ptrs[0] != ptrs[1]
    grads = torch.autograd.grad(first.float().square().sum(), (q, k, v), retain_graph=True)
    attend(q, k, v, ctx())  # the first graph is still alive (retained): its buffer is not reused
    assert ptrs[2] not in ptrs[:2]
    again = torch.autograd.grad(first.float().square().sum(), (q, k, v))  # reads the kept probabilities again
    for a, b in zip(grads, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    del first, again
    attend(q, k, v, ctx())  # now the first graph's buffer (or the third's, freed at once) is free
    assert ptrs[3] in (ptrs[0], ptrs[2])
    del second


def test_kernel_rejects_groups_it_cannot_pack():
    """Groups whose sizes are not multiples of 16 are left to ATen's kernels; given to the kernel
    directly, they are refused with an error, not computed wrong."""
    q = k = v = torch.randn(1, 1, 40, 32)
    bad = [masks.QueryGroup(0, 8, ((0, 8),), None)]
    assert not block_kernel.takes(bad[0])
    with pytest.raises(ValueError, match="rejected"):
        block_kernel.forward(q, k, v, torch.empty_like(q), bad)
    outside = [masks.QueryGroup(0, 16, ((0, 48),), None)]  # keys past L = 40
    with pytest.raises(ValueError, match="rejected"):
        block_kernel.forward(q, k, v, torch.empty_like(q), outside)
    # the C entry point itself refuses a negative group count (-1) instead of failing inside
    ok = [masks.QueryGroup(0, 16, ((0, 16),), None)]
    out, lse = torch.empty_like(q), torch.empty(1, 1, 40)
    args = lambda n: (0, 1, 1, 40, 40, 32, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),  # noqa: E731
                      block_kernel._strides(q, k, v, out), lse.data_ptr(), None, 0, block_kernel.encode(ok), n,
                      32 ** -0.5, 1)
    assert block_kernel.library().block_attention_forward(*args(1)) == 0
    assert block_kernel.library().block_attention_forward(*args(-1)) == -1


def test_bf16_rows_an_odd_number_of_elements_apart_are_copied_not_misread():
    lay = pack(LAYOUTS["16x64"], PackSpec()).layout
    L = lay.shape[1]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, L, 33, generator=g).bfloat16()[..., :32] for _ in range(3))  # row stride 33
    assert q.stride(2) == 33
    out = attend(q, k, v, AttnContext(lay, None, None, "block"))
    ref = naive(q, k, v, masks.dense_mask(lay)[:, None])
    torch.testing.assert_close(out.double(), ref, **TOL[torch.bfloat16])


def test_model_training_step_uses_the_kernel_and_matches_aten(monkeypatch):
    """One fp32 loss and its gradients of a small ACDiT whose blocks the kernel takes, with and
    without the kernel."""
    from unimodal.config import ModelConfig
    from unimodal.diffusion import LossConfig, train_scheduler, training_loss
    from unimodal.model import ACDiT
    calls = []
    real = block_kernel.backward
    monkeypatch.setattr(block_kernel, "backward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, hidden_size=64, num_heads=2, latent_channels=1, num_classes=10, attn_backend="block")
    model = ACDiT(cfg)  # head_dim 32
    g = torch.Generator().manual_seed(3)
    batch = pack([Sample([Image(torch.randn(1, 8, 8, generator=g), block=16)], label=i) for i in range(2)], PackSpec())

    def grads():
        model.zero_grad()
        loss, _ = training_loss(model, batch, train_scheduler(), LossConfig(), torch.Generator().manual_seed(1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    loss, gs = grads()
    assert calls, "the kernel's backward ran"
    monkeypatch.setattr(block_kernel, "supports", lambda q: False)
    loss_a, gs_a = grads()
    torch.testing.assert_close(loss, loss_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(gs, gs_a):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guided", [False, True])
def test_cached_passes_through_the_kernel_equal_the_full_forward(guided, monkeypatch):
    """Cached sampling with blocks the kernel takes (16 tokens, head dim 32): the own-pass groups and
    the committed cache go through the kernel, and every cached pass equals one full forward of the
    sequence so far (test_sampling's oracle)."""
    from test_sampling import SPEC, FullForwardOracle
    from unimodal.config import ModelConfig
    from unimodal.model import ACDiT
    from unimodal.sampling import SequenceSampler
    calls = {"n": 0, "longer_keys": 0, "inside": False}
    real, split = block_kernel.forward, attention._cached_split_attention

    def counted(q, k, v, out, groups, probs=None):  # kernel calls made by cached passes (not by the oracle's forwards)
        if calls["inside"]:
            calls["n"] += 1
            calls["longer_keys"] += k.shape[2] > q.shape[2]
        return real(q, k, v, out, groups, probs)

    def cached_pass(*a):
        calls["inside"] = True
        try:
            return split(*a)
        finally:
            calls["inside"] = False
    monkeypatch.setattr(block_kernel, "forward", counted)
    monkeypatch.setattr(attention, "_cached_split_attention", cached_pass)
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, hidden_size=64, num_heads=2, latent_channels=2, num_classes=10, attn_backend="block")
    model = ACDiT(cfg).eval()
    oracle = FullForwardOracle()
    s = SequenceSampler(model, SPEC, 2, labels=torch.tensor([3, 7]) if guided else None,
                        cfg_scale=2.0 if guided else 1.0, steps=2, generator=torch.Generator().manual_seed(1),
                        on_pass=oracle)
    s.image(2, 8, 8, block=16)  # 4 blocks of 16 tokens
    assert oracle.passes == s.passes == 8
    assert oracle.max_eps < 1e-5, oracle.max_eps
    # per layer: one call per pass for its own keys, one more per pass that has a committed cache
    # (5 of 8: the first block's two and the first step of the second commit only now)
    assert calls["n"] == (8 + 5) * cfg.depth and calls["longer_keys"] > 0, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inputs_the_kernel_cannot_read_in_place_are_copied(dtype):
    """A strided last axis (and, in bf16, an odd row stride) is read through a contiguous copy: the
    same results as the contiguous inputs; an output it cannot write in place is refused."""
    lay = pack(LAYOUTS["16x64"], PackSpec()).layout
    groups = masks.query_groups(lay.row(0))
    L, D = lay.shape[1], 64
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 2, L, D, generator=g).to(dtype) for _ in range(4))
    out = torch.empty_like(q)
    lse = block_kernel.forward(q, k, v, out, groups)
    q_strided = torch.zeros(1, 2, L, 2 * D, dtype=dtype)[..., ::2].copy_(q)  # last axis stride 2
    k_odd = torch.zeros(1, 2, L, D + 1, dtype=dtype)[..., :D].copy_(k)  # rows D + 1 apart
    out2 = torch.empty_like(q)
    lse2 = block_kernel.forward(q_strided, k_odd, v, out2, groups)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    ref = block_kernel.backward(q, k, v, out, dout, lse, groups, dtype)
    got = block_kernel.backward(q_strided, k_odd, v, out, dout, lse, groups, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    with pytest.raises(ValueError, match="out"):
        block_kernel.forward(q, k, v, torch.empty(1, 2, L, 2 * D, dtype=dtype)[..., ::2], groups)


def test_amx_is_used_exactly_where_the_cpu_has_it():
    """The bf16 products run on AMX tiles where the CPU reports AMX-TILE and AMX-BF16 (unless UNIMODAL_AMX=0),
    and the kernel targets AMX only through -march=native there; elsewhere the vector path runs."""
    has = block_kernel.AMX <= block_kernel._cpu_flags() and AVX512
    want = os.environ.get("UNIMODAL_AMX", "1") != "0"
    assert block_kernel.amx() == (has and want), "AMX not in use on a CPU that has it (OS permission refused?)"
    lib = block_kernel.library()
    try:
        assert lib.block_attention_amx(0) == 0  # switched off: the vector path
    finally:
        assert (lib.block_attention_amx(int(want)) == 1) == (has and want)


@needs_avx512
def test_tiles_that_fault_leave_the_kernel_on_the_vector_units(monkeypatch):
    """The tiles are used only after a product on them has matched the vector units' on this machine: where
    the tile product faults (SIGILL, here from the emulation), the kernel reports it (-4) and computes on the
    vector units."""
    tiny = torch.tensor(1e-38)
    torch.set_flush_denormal(True)  # the thread's MXCSR: the jump out of the fault must not reset it
    try:
        lib = block_kernel.build(emulate_amx=True, extra_flags=("-DUNIMODAL_AMX_EMULATE_FAULT",))
        assert (tiny * 0.01).item() == 0.0, "flush-to-zero lost across the caught fault"
    finally:
        torch.set_flush_denormal(False)
    assert (tiny * 0.01).item() != 0.0
    assert not lib.amx and lib.block_attention_amx(1) == -4
    lay = pack(LAYOUTS["4x48"], PackSpec()).layout
    q, k, v = (t.detach() for t in qkv(1, 2, lay.shape[1], 64, torch.bfloat16, seed=3))
    out = torch.empty_like(q)
    monkeypatch.setattr(block_kernel, "_lib", lib)
    block_kernel.forward(q, k, v, out, masks.query_groups(lay.row(0)))
    torch.testing.assert_close(out.double(), naive(q, k, v, masks.dense_mask(lay)[:, None]), **TOL[torch.bfloat16])


@needs_avx512
def test_amx_build_compiles_to_tile_instructions_and_falls_back_without_them(monkeypatch):
    """The kernel compiled for AMX (as -march=native does on an AMX CPU) holds the tile instructions, and on a
    CPU without AMX, or with the OS refusing the tile state, it keeps to the vector path: same results."""
    try:
        lib = block_kernel.build(extra_flags=("-mamx-tile", "-mamx-bf16"))
    except RuntimeError as e:
        if "amx" in str(e).lower():
            pytest.skip(f"the compiler does not target AMX: {str(e)[-200:]}")
        raise
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", lib._name], capture_output=True, text=True).stdout
        for op in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease"):
            assert op in asm, op
    assert lib.amx == (block_kernel.AMX <= block_kernel._cpu_flags())
    lay = pack(LAYOUTS["4x48"], PackSpec()).layout
    groups = masks.query_groups(lay.row(0))
    q, k, v = (t.detach() for t in qkv(1, 2, lay.shape[1], 64, torch.bfloat16, seed=2))
    out = torch.empty_like(q)
    monkeypatch.setattr(block_kernel, "_lib", lib)
    block_kernel.forward(q, k, v, out, groups)
    torch.testing.assert_close(out.double(), naive(q, k, v, masks.dense_mask(lay)[:, None]), **TOL[torch.bfloat16])
