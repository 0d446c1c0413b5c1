"""The training draws: noising against diffusers' own add_noise, label dropout for guidance."""
import random

import torch

from conftest import random_sample
from unimodal.diffusion import block_labels, draw, noise_blocks, train_scheduler
from unimodal.sequence import PackSpec, pack


def test_each_block_is_noised_at_its_own_timestep_as_diffusers_adds_noise():
    rng = random.Random(3)
    samples = [random_sample(rng, max_segments=3) for _ in range(4)]
    packed = pack(samples, PackSpec())
    sched = train_scheduler()
    d = draw(packed, 1000, 0.0, torch.Generator().manual_seed(0))
    out = noise_blocks(packed, sched, d.t, d.eps)  # (B, L, P)
    noisy = packed.noisy.bool()
    assert noisy.any() and len(set(d.t.tolist())) > 1
    assert torch.equal(out[~noisy], packed.patches[~noisy])  # text, clean copies and padding untouched
    for b in range(packed.n_blocks):
        sel = noisy & (packed.block_id == b)  # (B, L): block b's noised copy
        want = sched.add_noise(packed.patches[sel], d.eps[sel], d.t[b].expand(int(sel.sum())))
        torch.testing.assert_close(out[sel], want, atol=1e-6, rtol=1e-6)


def test_label_dropout_drops_whole_samples_to_the_null_class():
    rng = random.Random(4)
    samples = [random_sample(rng, max_segments=2) for _ in range(40)]
    packed = pack(samples, PackSpec())
    labelled = packed.block_label >= 0
    assert labelled.any()
    null = 10
    for p, want in ((0.0, "none"), (1.0, "all")):
        y = block_labels(packed, null, draw(packed, 1000, p, torch.Generator().manual_seed(1)).drop)
        kept = torch.where(labelled, packed.block_label, torch.full_like(y, null))
        assert torch.equal(y, kept) if want == "none" else bool((y == null).all())
    gens = [torch.Generator().manual_seed(i) for i in range(packed.n_samples)]
    drop = draw(packed, 1000, 0.5, gens).drop  # (n_samples,)
    y = block_labels(packed, null, drop)
    assert 0.2 < float(drop.float().mean()) < 0.8
    for i in range(packed.n_samples):
        blocks = packed.block_sample == i
        labels = set(y[blocks].tolist())
        assert len(labels) <= 1  # a sample's blocks are dropped together
        if blocks.any() and packed.block_label[blocks][0] >= 0:
            assert labels == ({null} if drop[i] else {int(packed.block_label[blocks][0])})
