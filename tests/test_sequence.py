"""Packing segments into rows: positions (DESIGN.md section 3), units, block shapes, round trip."""
import random

import pytest
import torch

from conftest import random_sample
from unimodal.sequence import BLOCK, IGNORE, PAD, TEXT, Image, PackSpec, Sample, Text, Video, pack, unpack_latents


def expected_positions(sample: Sample, patch: int):
    """Clean-stream positions written out from DESIGN.md section 3 (raster order inside blocks)."""
    out, p = [], 0
    for seg in sample.segments:
        if isinstance(seg, Text):
            for _ in range(len(seg.tokens)):
                out.append((p, p, p))
                p += 1
        elif isinstance(seg, Image):
            _, H, W = seg.latent.shape
            Hp, Wp = H // patch, W // patch
            blk = seg.block or Hp * Wp
            k = int(blk ** 0.5) if blk != Hp * Wp else None
            kh, kw = (k, k) if k else (Hp, Wp)
            for bh in range(Hp // kh):
                for bw in range(Wp // kw):
                    for i in range(kh):
                        for j in range(kw):
                            out.append((p, p + bh * kh + i, p + bw * kw + j))
            p = max(pos for trip in out for pos in trip) + 1
        else:
            T, _, H, W = seg.latent.shape
            for t in range(T):
                for h in range(H // patch):
                    for w in range(W // patch):
                        out.append((p + t, p + h, p + w))
            p = max(pos for trip in out for pos in trip) + 1
    return out


def expected_units(sample: Sample, patch: int) -> list[int]:
    """Clean-stream units written out from DESIGN.md section 2: each text token, each image block and each
    video block (frames_per_block whole frames) is the next unit."""
    out, u = [], 0
    for seg in sample.segments:
        if isinstance(seg, Text):
            n_tokens, per_unit = len(seg.tokens), 1
        elif isinstance(seg, Image):
            _, H, W = seg.latent.shape
            n_tokens = (H // patch) * (W // patch)
            per_unit = seg.block or n_tokens
        else:
            T, _, H, W = seg.latent.shape
            n_tokens = T * (H // patch) * (W // patch)
            per_unit = seg.frames_per_block * (H // patch) * (W // patch)
        for i in range(n_tokens):
            out.append(u + i // per_unit)
        u += n_tokens // per_unit
    return out


@pytest.mark.parametrize("patch", [1, 2])
def test_positions_units_and_twins(patch):
    rng = random.Random(patch)
    for _ in range(60):
        s = random_sample(rng, patch=patch, max_segments=4)
        pk = pack([s], PackSpec(patch_size=patch))
        clean = (pk.noisy[0] == 0) & (pk.doc[0] == 0)
        assert pk.pos[0][clean].tolist() == [list(x) for x in expected_positions(s, patch)]
        # units: every text token its own step, every block one step, the next segment's later
        steps = pk.step[0][clean]
        ranks = torch.unique(steps, sorted=True, return_inverse=True)[1]  # the steps' order: 0, 1, 2, ...
        assert ranks.tolist() == expected_units(s, patch)
        assert (steps[1:] >= steps[:-1]).all()
        # each noised token has its clean twin's step and position
        for b in range(pk.n_blocks):
            c = (pk.block_id[0] == b) & (pk.noisy[0] == 0)
            n = (pk.block_id[0] == b) & (pk.noisy[0] == 1)
            assert torch.equal(pk.pos[0][c], pk.pos[0][n]) and torch.equal(pk.step[0][c], pk.step[0][n])
            assert len(set(pk.step[0][n].tolist())) == 1


def test_image_blocks_are_squares_and_video_blocks_whole_frames():
    s = Sample([Image(torch.randn(1, 8, 8), block=4), Video(torch.randn(6, 1, 2, 2), frames_per_block=3)])
    pk = pack([s], PackSpec())
    n = pk.noisy[0] == 1
    for b in range(pk.n_blocks):
        pos = pk.pos[0][n & (pk.block_id[0] == b)]
        if b < 16:
            hs, ws = sorted(set(pos[:, 1].tolist())), sorted(set(pos[:, 2].tolist()))
            assert len(hs) == 2 and len(ws) == 2 and len(pos) == 4 and hs[1] - hs[0] == 1
        else:
            ts = sorted(set(pos[:, 0].tolist()))
            assert len(ts) == 3 and len(pos) == 3 * 4


def test_round_trip_several_docs_per_row():
    rng = random.Random(7)
    samples = [random_sample(rng, channels=3, patch=2) for _ in range(8)]
    spec = PackSpec(patch_size=2, latent_channels=3)
    pk = pack(samples, spec, max_len=400)
    assert pk.tokens.shape[1] == 400 and pk.tokens.shape[0] < 8
    for copy in ("clean", "noisy"):
        out = unpack_latents(pk, pk.patches, spec, copy=copy)
        for s, lat in zip(samples, out):
            want = [seg.latent for seg in s.segments if not isinstance(seg, Text)]
            assert len(want) == len(lat) and all(torch.equal(a, b) for a, b in zip(want, lat))
    # text targets are the next token inside each text segment
    for r in range(pk.tokens.shape[0]):
        tt = pk.text_target[r]
        for i in torch.nonzero(tt != IGNORE).flatten().tolist():
            assert pk.kind[r, i + 1] == TEXT and tt[i] == pk.tokens[r, i + 1]
    assert (pk.doc[pk.kind == PAD] == -1).all()


def test_dead_clean_blocks_can_be_dropped():
    s = Sample([Image(torch.randn(1, 4, 4), block=4)])
    full, lean = pack([s], PackSpec()), pack([s], PackSpec(drop_dead_clean=True))
    assert full.tokens.shape[1] - lean.tokens.shape[1] == 4  # the last clean block
    s2 = Sample([Image(torch.randn(1, 4, 4), block=4), Text(torch.tensor([1, 2]))])
    assert pack([s2], PackSpec(drop_dead_clean=True)).tokens.shape[1] == pack([s2], PackSpec()).tokens.shape[1]


@pytest.mark.parametrize("seg,msg", [
    (Image(torch.randn(1, 6, 6), block=16), "does not tile"),
    (Image(torch.randn(1, 4, 4), block=3), "not a square"),
    (Video(torch.randn(3, 1, 2, 2), frames_per_block=2), "not divisible"),
    (Text(torch.tensor([], dtype=torch.long)), "empty text"),
])
def test_bad_segments_are_refused_clearly(seg, msg):
    with pytest.raises(ValueError, match=msg):
        pack([Sample([seg])], PackSpec())


def test_too_long_sample_for_the_row():
    with pytest.raises(ValueError, match="more than max_len"):
        pack([Sample([Image(torch.randn(1, 4, 4))])], PackSpec(), max_len=20)
