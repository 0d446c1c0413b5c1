"""The KV cache and the samplers: every cached pass equals one full forward of the sequence so far
under the training mask; cached and recomputed sampling agree; shared-cache guidance equals two
separate streams; text decoding controls."""
import dataclasses
import random

import pytest
import torch

from unimodal.config import ModelConfig
from unimodal.masks import Layout
from unimodal.model import ACDiT, ModelInput
from unimodal.sampling import SequenceSampler, row_generators, sample_images, sample_videos
from unimodal.sequence import PackSpec

from test_model import randomised

SPEC = PackSpec(patch_size=1, latent_channels=2)


def model_fp32(backend="sdpa") -> ACDiT:
    cfg = ModelConfig.preset("ACDiT-Micro", latent_channels=2, patch_size=1, vocab_size=40, num_classes=10,
                             attn_backend=backend)
    m = randomised(ACDiT(cfg))
    with torch.no_grad():  # keep activations in a sane range for fp32 comparisons
        for p in m.parameters():
            p.mul_(0.5)
    return m


class FullForwardOracle:
    """After every cached pass: run the whole sequence so far (committed history + this pass's
    clean tokens + one noised copy) through the model without cache, under the training mask
    (noisy 0/1, one guidance stream per forward), and compare. A pass's guidance streams are the
    noised copies 1..S of its rows."""

    def __init__(self):
        self.max_eps = self.max_logit = 0.0
        self.passes = 0

    def __call__(self, sampler, inp: ModelInput, n_commit: int, out):
        rows = inp.tokens.shape[0]
        hist = sampler.history
        rep = rows // sampler.B
        if hist:
            h_ids = torch.cat([h.ids for h in hist], 1).repeat(rep, 1)
            h_patch = torch.cat([h.patches for h in hist], 1).repeat(rep, 1, 1)
            h_text = torch.cat([h.is_text for h in hist])[None].expand(rows, -1)
            h_step = torch.cat([h.step for h in hist])[None].expand(rows, -1)
            h_pos = torch.cat([h.pos for h in hist])[None].expand(rows, -1, -1)
        else:
            h_ids, h_patch = inp.tokens[:, :0], inp.patches[:, :0]
            h_text, h_step, h_pos = inp.is_text[:, :0], inp.layout.step[:, :0], inp.pos[:, :0]
        nh = h_ids.shape[1]
        noisy = inp.layout.noisy[0]
        assert bool((noisy[:n_commit] == 0).all())
        copies = sorted(set(noisy[n_commit:].tolist())) or [None]
        for c in copies:
            cols = torch.cat([torch.arange(n_commit), torch.nonzero(noisy == c).flatten() if c else torch.arange(0)])
            n = cols.numel()
            full = ModelInput(
                torch.cat([h_ids, inp.tokens[:, cols]], 1), torch.cat([h_patch.to(inp.patches.dtype), inp.patches[:, cols]], 1),
                torch.cat([h_text, inp.is_text[:, cols]], 1),
                Layout(torch.zeros(rows, nh + n, dtype=torch.long), torch.cat([h_step, inp.layout.step[:, cols]], 1),
                       torch.cat([torch.zeros_like(h_step), (inp.layout.noisy[:, cols] > 0).long()], 1)),
                torch.cat([h_pos, inp.pos[:, cols]], 1), torch.cat([torch.full_like(h_step, -1), inp.cond_index[:, cols]], 1),
                inp.t, inp.y)
            logits_at = None
            if out.logits is not None:
                logits_at = torch.zeros(rows, nh + n, dtype=torch.bool)
                logits_at[:sampler.B, nh + n_commit - 1] = True
            ref = sampler.model(full, logits_at=logits_at)
            self.max_eps = max(self.max_eps, float((ref.eps[:, nh:] - out.eps[:, cols]).abs().max()))
            if out.logits is not None:
                self.max_logit = max(self.max_logit, float((ref.logits - out.logits).abs().max()))
        self.passes += 1


def random_program(sampler: SequenceSampler, rng: random.Random):
    """A random mixed sequence: prompts, generated text, images and videos with random block sizes."""
    outs = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(["prompt", "text", "image", "video"])
        if kind == "prompt" or (kind == "text" and not sampler.pending and not sampler.history):
            sampler.feed_text(torch.randint(0, 40, (sampler.B, rng.randint(1, 4))))
            if kind == "text":
                outs.append(sampler.text(rng.randint(1, 3), temperature=rng.choice([0, 1.0]), top_k=5))
        elif kind == "text":
            if not sampler.pending or not bool(sampler.pending[-1].is_text[-1]):
                sampler.feed_text(torch.randint(0, 40, (sampler.B, 1)))  # a marker after a block
            outs.append(sampler.text(rng.randint(1, 3), temperature=rng.choice([0, 1.0]), top_k=5))
        elif kind == "image":
            k = rng.choice([1, 2, 4])
            outs.append(sampler.image(2, 4, 4, block=k * k))
        else:
            f = rng.choice([1, 2])
            outs.append(sampler.video(2 * f, 2, 2, 2, frames_per_block=f))
    if not outs:
        outs.append(sampler.image(2, 4, 4, block=4))
    return outs


@pytest.mark.parametrize("backend", ["sdpa", "block"])
@pytest.mark.parametrize("guided", [False, True])
def test_every_cached_pass_equals_the_full_forward(guided, backend, monkeypatch):
    from unimodal import attention
    split = attention._cached_split_attention
    calls = []
    monkeypatch.setattr(attention, "_cached_split_attention", lambda *a: calls.append(1) or split(*a))
    model = model_fp32(backend)
    for seed in range(6):
        rng = random.Random(seed)
        oracle = FullForwardOracle()
        labels = torch.tensor([3, 7]) if guided else None
        s = SequenceSampler(model, SPEC, 2, labels=labels, cfg_scale=2.0 if guided else 1.0, steps=3,
                            generator=torch.Generator().manual_seed(seed), on_pass=oracle)
        random_program(s, rng)
        assert oracle.passes == s.passes > 0
        assert oracle.max_eps < 1e-5 and oracle.max_logit < 1e-5, (seed, oracle.max_eps, oracle.max_logit)
    assert (len(calls) > 0) == (backend == "block")  # the split cache path really ran


def test_a_finished_block_costs_no_extra_pass():
    model = model_fp32()
    s = SequenceSampler(model, SPEC, 1, steps=4)
    s.image(2, 4, 4, block=4)  # 4 blocks x 4 steps
    assert s.passes == 16 and s.cache.length == 3 * 4  # the last block is never committed: nothing follows
    s.feed_text(torch.tensor([[5]]))
    s.text(2, temperature=0)
    assert s.passes == 18 and s.cache.length == 4 * 4 + 2


def test_guided_passes_carry_clean_tokens_once_and_noised_tokens_per_stream():
    """Shared-cache guidance: a pass has B rows; the pending clean block appears once, the noised
    block twice (one copy per stream), and every clean token is committed once."""
    model = model_fp32()
    seen = []
    s = SequenceSampler(model, SPEC, 3, labels=torch.tensor([0, 4, 9]), cfg_scale=2.0, steps=2,
                        on_pass=lambda smp, inp, nc, out: seen.append((inp.tokens.shape, nc, inp.layout.noisy[0].clone())))
    s.image(2, 4, 4, block=4)  # 4 blocks of 4 tokens
    assert len(seen) == 8
    for i, (shape, nc, noisy) in enumerate(seen):
        assert shape[0] == 3
        assert nc == (4 if i in (2, 4, 6) else 0)  # the previous block, on the next block's first step
        assert noisy[:nc].eq(0).all() and noisy[nc:].tolist() == [1] * 4 + [2] * 4
    assert s.cache.length == 12 and s.cache.kv.shape[2] == 3


@pytest.mark.parametrize("scheduler", ["dpm", "ddim", "ddpm"])
def test_cached_and_recomputed_sampling_give_the_same_samples(scheduler):
    model = model_fp32()
    outs = []
    for mode in ("cache", "recompute"):
        s = SequenceSampler(model, SPEC, 2, labels=torch.tensor([1, 2]), cfg_scale=1.5, scheduler=scheduler,
                            steps=4, generator=torch.Generator().manual_seed(5), mode=mode)
        s.feed_text(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        img = s.image(2, 4, 4, block=4)
        s.feed_text(torch.tensor([[9], [9]]))
        txt = s.text(4, temperature=0.8, top_k=10, top_p=0.9)
        vid = s.video(4, 2, 2, 2, frames_per_block=2)
        outs.append((img, txt, vid))
    (i1, t1, v1), (i2, t2, v2) = outs
    torch.testing.assert_close(i1, i2, atol=1e-5, rtol=1e-5)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_shared_cache_guidance_equals_two_separate_streams():
    model = model_fp32()
    res = []
    for shared in (True, False):
        s = SequenceSampler(model, SPEC, 3, labels=torch.tensor([0, 4, 9]), cfg_scale=2.5, steps=5,
                            generator=torch.Generator().manual_seed(2), shared_cache=shared)
        res.append(s.image(2, 4, 4, block=4))
        if shared:
            assert s.cache.kv.shape[2] == 3
        else:
            assert s.cache.kv.shape[2] == 6
    # the same sums in another order (stacked queries vs one stream per call): fp32 rounding, grown by 5 steps
    torch.testing.assert_close(res[0], res[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["dpm", "ddim", "ddpm"])
def test_a_perfect_noise_prediction_recovers_latents_outside_unit_range(scheduler):
    """Latents (scaled VAE latents: std about 1) are not clipped to [-1, 1]: fed the exact noise of the
    current sample, every solver ends on the clean latents, whatever their range."""
    from unimodal.diffusion import sampling_scheduler
    sched = sampling_scheduler(scheduler)
    g = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(2, 16, 4, generator=g) + 1.5  # (B, n, P): a third of the values beyond [-1, 1]
    sched.set_timesteps(10)
    x = torch.randn(x0.shape, generator=g)  # (B, n, P)
    ab = sched.alphas_cumprod
    for t in sched.timesteps:
        a = ab[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that makes x the noised x0 at t
        x = sched.step(eps, t, x, generator=g).prev_sample
    assert torch.allclose(x, x0, atol=1e-3), float((x - x0).abs().max())


@pytest.mark.parametrize("scheduler", ["dpm", "ddpm"])  # ddpm: fresh noise at every solver step too
def test_per_row_generators_make_a_sample_independent_of_its_batch(scheduler):
    """With one generator per row, a sample is the same whether drawn alone or among others (images and
    sampled text), and another seed gives another sample."""
    model = model_fp32()
    labels = torch.tensor([1, 2, 3])

    def draw(rows, seed, first):
        s = SequenceSampler(model, SPEC, len(rows), labels=labels[rows], cfg_scale=1.5, steps=3, scheduler=scheduler,
                            generator=row_generators(seed, len(rows), first))
        img = s.image(2, 4, 4, block=4)  # (n, 2, 4, 4)
        s.feed_text(torch.ones(len(rows), 1, dtype=torch.long))
        return img, s.text(6, temperature=1.5)  # (n, 6) tokens drawn from flat distributions

    img3, txt3 = draw([0, 1, 2], seed=5, first=0)
    img2, txt2 = draw([1, 2], seed=5, first=1)
    assert torch.allclose(img3[1:], img2, rtol=1e-4, atol=1e-4), float((img3[1:] - img2).abs().max())  # batch rounding
    assert torch.equal(txt3[1:], txt2)
    other, other_txt = draw([1, 2], seed=6, first=1)
    assert float((other - img2).abs().max()) > 0.1 and not torch.equal(other_txt, txt2)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        SequenceSampler(model, SPEC, 3, generator=row_generators(0, 2))


def test_guidance_formula_against_unguided_streams():
    """eps = uncond + s (cond - uncond): one guided step equals the combination of two unguided runs."""
    model = model_fp32()
    outs = {}
    for name, labels, scale in (("cond", torch.tensor([3]), 1.0), ("uncond", None, 1.0), ("cfg", torch.tensor([3]), 3.0)):
        rec = []
        s = SequenceSampler(model, SPEC, 1, labels=labels, cfg_scale=scale, steps=1, scheduler="ddim",
                            generator=torch.Generator().manual_seed(0),
                            on_pass=lambda smp, inp, nc, out: rec.append(out.eps.clone()))
        s.image(2, 2, 2)
        outs[name] = rec[0]
    c, u, g = outs["cond"][0], outs["uncond"][0], outs["cfg"][0]  # (4, P), (4, P), (2 copies x 4, P)
    torch.testing.assert_close(g[:4], c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g[4:], u, atol=1e-6, rtol=1e-6)
    # and the guided image is one DDIM step of uncond + s (cond - uncond) from the same starting noise
    from unimodal.diffusion import sampling_scheduler
    guided = SequenceSampler(model, SPEC, 1, labels=torch.tensor([3]), cfg_scale=3.0, steps=1, scheduler="ddim",
                             generator=torch.Generator().manual_seed(0)).image(2, 2, 2)  # (1, 2, 2, 2)
    sched = sampling_scheduler("ddim")
    sched.set_timesteps(1)
    x_T = torch.randn((1, 4, 2), generator=torch.Generator().manual_seed(0))  # (1, 4 tokens, P)
    want = sched.step((u + 3.0 * (c - u))[None], sched.timesteps[0], x_T).prev_sample  # (1, 4, P)
    torch.testing.assert_close(guided.permute(0, 2, 3, 1).reshape(1, 4, 2), want, atol=1e-5, rtol=1e-5)
    unguided = SequenceSampler(model, SPEC, 1, labels=torch.tensor([3]), steps=1, scheduler="ddim",
                               generator=torch.Generator().manual_seed(0)).image(2, 2, 2)
    assert float((unguided - guided).abs().max()) > 1e-3  # the guidance scale changes the image


def test_video_longer_than_training_block_by_block():
    model = model_fp32()
    oracle = FullForwardOracle()
    s = SequenceSampler(model, SPEC, 1, labels=torch.tensor([2]), steps=2, on_pass=oracle)
    v = s.video(16, 2, 2, 2, frames_per_block=2)  # 8 blocks
    assert v.shape == (1, 16, 2, 2, 2) and torch.isfinite(v).all()
    assert oracle.max_eps < 1e-5


def test_text_decoding_controls():
    model = model_fp32()
    s = SequenceSampler(model, SPEC, 2, steps=1)
    s.feed_text(torch.tensor([[1, 2], [3, 4]]))
    greedy_first = []
    s.on_pass = lambda smp, inp, nc, out: greedy_first.append(out.logits.argmax(-1))
    toks = s.text(3, temperature=0)
    assert torch.equal(toks[:, 0], greedy_first[0])
    # stop tokens, against free decoding (each row from its own generator, so one row's stop leaves the others'
    # draws alone): a row stops at its first stop token and emits stop[0] after it, the others go on as they
    # would have, and the stream ends once every row has stopped
    def decode(n, stop=None):
        smp = SequenceSampler(model, SPEC, 2, steps=1, generator=row_generators(7, 2))
        smp.feed_text(torch.tensor([[1, 2], [3, 4]]))
        return smp.text(n, temperature=1.0, stop=stop)
    free = decode(12)
    a, b = free[0].tolist(), free[1].tolist()
    # row 0 stops at the first step k whose token neither row emits earlier (row 1: at all)
    k = next(i for i in range(1, 12) if a[i] not in a[:i] and a[i] not in b)
    toks = decode(12, stop=[a[k]])
    assert toks.shape == (2, 12) and toks[1].tolist() == b  # row 1 never stops
    assert toks[0].tolist() == a[:k + 1] + [a[k]] * (11 - k)
    m = next((i for i in range(k + 1, 12) if b[i] not in b[:i] and b[i] not in a), None)
    assert m is not None  # both stop: the stream ends at the later stop; the earlier row pads with stop[0]
    toks = decode(12, stop=[a[k], b[m]])
    assert toks.shape == (2, m + 1) and toks[1].tolist() == b[:m + 1]
    assert toks[0].tolist() == a[:k + 1] + [a[k]] * (m - k)
    # top-k = 1 is greedy
    s3 = SequenceSampler(model, SPEC, 2, steps=1, generator=torch.Generator().manual_seed(1))
    s3.feed_text(torch.tensor([[1, 2], [3, 4]]))
    s4 = SequenceSampler(model, SPEC, 2, steps=1)
    s4.feed_text(torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(s3.text(5, temperature=1.0, top_k=1), s4.text(5, temperature=0))


def test_convenience_samplers_shapes():
    model = model_fp32()
    x = sample_images(model, SPEC, torch.tensor([1, 2]), (2, 4, 4), block=4, cfg_scale=1.5, steps=2)
    assert x.shape == (2, 2, 4, 4)
    v = sample_videos(model, SPEC, torch.tensor([1]), (4, 2, 2, 2), frames_per_block=2, steps=2)
    assert v.shape == (1, 4, 2, 2, 2)


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _has_flash(), reason="flash-attn decoding needs CUDA and the flash-attn extra")
def test_flash_decoding_equals_sdpa_decoding(monkeypatch):
    from unimodal import attention
    kernels = attention._flash_kernels
    calls = []
    monkeypatch.setattr(attention, "_flash_kernels", lambda: calls.append(1) or kernels())
    outs = []
    for backend in ("sdpa", "flash"):
        cfg = ModelConfig.preset("ACDiT-Micro", latent_channels=2, patch_size=1, vocab_size=40, num_classes=10,
                                 attn_backend=backend)
        torch.manual_seed(0)
        m = randomised(ACDiT(cfg)).cuda().to(torch.bfloat16)
        s = SequenceSampler(m, SPEC, 2, labels=torch.tensor([1, 2]), cfg_scale=1.5, steps=3,
                            generator=torch.Generator().manual_seed(0))
        outs.append(s.image(2, 4, 4, block=4).float().cpu())
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)
    assert calls  # flash_attn_with_kvcache served the cached passes


def test_fed_image_conditions_text_like_the_full_forward():
    """A real image fed as clean blocks, then text decoded: every pass equals the full forward."""
    model = model_fp32()
    oracle = FullForwardOracle()
    s = SequenceSampler(model, SPEC, 2, steps=1, on_pass=oracle)
    s.feed_text(torch.tensor([[1], [1]]))
    s.feed_image(torch.randn(2, 2, 4, 4), block=4)
    s.feed_text(torch.tensor([[2], [2]]))
    toks = s.text(3, temperature=0)
    assert toks.shape == (2, 3) and oracle.passes == 3 and s.cache.length == 1 + 16 + 3
    assert oracle.max_logit < 1e-5


def test_bf16_autocast_sampling_stays_close_to_fp32():
    model = model_fp32()
    outs = [SequenceSampler(model, SPEC, 2, labels=torch.tensor([1, 2]), cfg_scale=1.5, steps=3, precision=p,
                            generator=torch.Generator().manual_seed(0)).image(2, 4, 4, block=4) for p in ("fp32", "bf16")]
    assert outs[1].dtype == torch.float32
    err = float((outs[0] - outs[1]).abs().max() / outs[0].abs().max())
    assert 0 < err < 0.1


@pytest.mark.parametrize("with_text", [False, True])
def test_bf16_sampling_computes_what_bf16_training_computes(with_text):
    """bf16 sampling casts the weights once instead of on every pass, yet every pass computes exactly what
    the model with its fp32 master weights computes under bf16 autocast, as in training (the residual
    stream, norms and modulation in fp32; only the projections in bf16)."""
    model = model_fp32()
    diffs = []

    def oracle(s, inp, n_commit, out):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(inp)
        diffs.append(float((out.eps.float() - ref.eps.float()).abs().max()))

    s = SequenceSampler(model, SPEC, 2, labels=torch.tensor([1, 2]), cfg_scale=1.5, steps=2, precision="bf16",
                        mode="recompute", on_pass=oracle, generator=torch.Generator().manual_seed(0))
    if with_text:
        s.feed_text(torch.tensor([[1, 5], [1, 7]]))
    s.image(2, 4, 4, block=4)
    assert len(diffs) == s.passes > 0 and max(diffs) == 0.0, diffs


@pytest.mark.parametrize("backend", ["sdpa", "block"])
def test_compiled_regions_sample_as_eager(backend):
    """model.compile=True also fuses the cached passes (varying pass lengths, the pending clean
    tokens of each first step, text passes): the same samples and text as the eager model."""
    outs = []
    for compile_ in (False, True):
        model = model_fp32(backend)
        model.cfg = dataclasses.replace(model.cfg, compile=compile_)
        s = SequenceSampler(model, SPEC, 2, labels=torch.tensor([1, 2]), cfg_scale=1.5, steps=2,
                            generator=torch.Generator().manual_seed(0))
        s.feed_text(torch.tensor([[1], [1]]))
        img = s.image(2, 4, 4, block=4)
        s.feed_text(torch.tensor([[2], [2]]))
        outs.append((img, s.text(3, temperature=0)))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(outs[1][1], outs[0][1])
