"""The generative tasks end to end: each tiny config trains a few steps through train.train and
evaluates, writing its figures and metrics; the losses go down; the measurements are checked
against independent counts (bytes of the held-out text, real clips through the classifier, a full
forward of the packed sequence for the image feed of the caption task)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import train
from tasks.class_video import digit_crops
from tasks.mixed_caption import DIGITS, feed_image
from tasks.text_lm import token_bytes
from unimodal.config import load_config
from unimodal.diffusion import model_input
from unimodal.model import ACDiT
from unimodal.sampling import SequenceSampler
from unimodal.sequence import Image, Sample, Text, pack

from test_model import randomised

ROOT = Path(__file__).resolve().parents[1]
FAST = ["time_limit_min=0", "ckpt_every=100000", "log_every=1000", "optim.warmup_steps=0", "ema_decay=0.0"]


def run(config: str, out: Path, steps: int, *overrides: str):
    cfg = load_config(ROOT / "configs" / config, [f"steps={steps}", f"out_dir={out}", *FAST, *overrides])
    return cfg, train.train(cfg, quiet=True)


def went_down(history: list[dict], key: str, k: int = 4) -> tuple[float, float]:
    vals = [h[key] for h in history]
    first, last = float(np.mean(vals[:k])), float(np.mean(vals[-k:]))
    assert last < first, f"{key} did not decrease: {vals}"
    return first, last


def frames_of(path: Path) -> int:
    with PILImage.open(path) as im:
        return im.n_frames


def test_text_lm_trains_and_scores(tmp_path):
    cfg, res = run("kjv_text_tiny.py", tmp_path, 30, "global_batch=8", "task.seq_len=64", "optim.lr=3e-3",
                   "task.eval_tokens=1500", "task.sample_tokens=6", "task.samples_per_prompt=1",
                   "task.prompts=('In the beginning',)")
    first, last = went_down(res["history"], "text")
    assert first > 7.0 and last < 6.5  # from ~ln(2048) = 7.62
    m = res["eval"]
    V = m["vocab_size"]
    assert V == 2048 and m["uniform_perplexity"] == V
    assert math.isfinite(m["perplexity"]) and 1 < m["perplexity"] < V
    assert m["eval_tokens"] > 0 and m["eval_bytes"] > m["eval_tokens"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"perplexity", "bits_per_byte", "loss", "eval_tokens"} <= set(saved)
    text = (tmp_path / "eval" / "samples.txt").read_text()
    assert "greedy: In the beginning" in text and "top_p=0.9" in text


def test_held_out_loss_is_the_cross_entropy_the_cached_decoder_sees():
    """score()'s loss, perplexity and bits per byte over two held-out windows, against the same windows fed
    token by token through the KV-cached sampler (another path through the model), their next-token
    cross-entropy summed by hand and the UTF-8 bytes of the predicted tokens."""
    import torch.nn.functional as F
    from tasks import build_task
    cfg = load_config(ROOT / "configs/kjv_text_tiny.py", ["task.seq_len=16", "model.depth=2", "model.hidden_size=64",
                                                          "model.num_heads=1", "precision=fp32"])
    task = build_task(cfg)
    torch.manual_seed(0)
    model = randomised(task.build_model()).eval()
    m = task.score(model, "test", max_tokens=2 * 15)
    nb = token_bytes(task.codec)
    nll, n_bytes = 0.0, 0
    for i in range(2):
        w = task.window("test", i)  # (16,)
        s = SequenceSampler(model, task.spec, 1, max_len=40)
        for j in range(len(w) - 1):
            s.feed_text(w[j:j + 1][None])
            _, logits = s._pass(want_logits=True)  # (1, V): the prediction of token j + 1
            nll += float(F.cross_entropy(logits.float(), w[j + 1:j + 2]))
            n_bytes += int(nb[int(w[j + 1])])
    assert m["eval_tokens"] == 30 and m["eval_bytes"] == n_bytes
    assert m["loss"] == pytest.approx(nll / 30, rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(nll / 30), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_text_lm_byte_count_matches_the_text():
    """The per-token byte counts behind bits per byte add up to the held-out text's UTF-8 bytes."""
    from tasks.text_lm import TextLMTask
    cfg = load_config(ROOT / "configs" / "kjv_text_tiny.py")
    task = TextLMTask(cfg)
    ids, n_bytes = task.stream("test")
    texts = [str(s) for s in __import__("unimodal.data", fromlist=["kjv"]).kjv("test")[:]["text"]]
    assert n_bytes == sum(len(s.encode("utf-8")) for s in texts) + len(texts)  # + one separator a verse
    assert int(token_bytes(task.codec)[ids.numpy()].sum()) == n_bytes
    # windows overlap by one token: every token but the first is a target exactly once
    L = cfg.task.seq_len
    n = task.windows("test")
    assert torch.equal(torch.cat([task.window("test", i)[1:] for i in range(n)]), ids[1:n * (L - 1) + 1])


def test_class_video_trains_and_evaluates(tmp_path):
    _, res = run("moving_mnist_video_tiny.py", tmp_path, 16, "global_batch=4", "task.num_clips=64", "task.frames=4",
                 "task.extend_frames=8", "task.eval_samples=4", "task.eval_batch=4", "task.sample_steps=2",
                 "optim.lr=2e-3")
    went_down(res["history"], "image")
    ev = tmp_path / "eval"
    for name in ("videos.gif", "videos.mp4", "videos_extended.gif", "samples.npz", "metrics.json"):
        assert (ev / name).stat().st_size > 0, name
    assert frames_of(ev / "videos.gif") == 4 and frames_of(ev / "videos_extended.gif") == 8
    m = json.loads((ev / "metrics.json").read_text())
    assert {"frame_accuracy", "clip_accuracy", "frame_consistency", "real_frame_accuracy",
            "extend_frame_accuracy"} <= set(m)
    assert m["real_frame_accuracy"] > 0.9  # the measurement itself works on real clips
    with np.load(ev / "samples.npz") as z:
        assert z["videos"].shape == (4, 4, 32, 32, 1) and z["videos"].dtype == np.uint8
        assert list(z["labels"]) == [0, 1, 2, 3]


def test_digit_crops_find_the_digit():
    """The crop of a digit pasted anywhere on a larger canvas keeps all of its ink and its class."""
    from unimodal import mnist_net
    from unimodal.data import mnist_arrays
    x, y = mnist_arrays("test")
    canvas = np.zeros((3, 40, 40), np.uint8)
    for i, (y0, x0) in enumerate([(0, 0), (12, 5), (7, 12)]):
        canvas[i, y0:y0 + 28, x0:x0 + 28] = x[i]
    crops = digit_crops(canvas)
    assert crops.shape == (3, 28, 28)
    assert np.array_equal(crops.reshape(3, -1).sum(1, dtype=np.int64), x[:3].reshape(3, -1).sum(1, dtype=np.int64))
    assert np.array_equal(mnist_net.classify(crops).argmax(-1).numpy(), y[:3])


def test_mixed_caption_trains_and_evaluates(tmp_path):
    _, res = run("mnist_mixed_tiny.py", tmp_path, 16, "global_batch=8", "task.eval_samples=10",
                 "task.eval_batch=10", "task.sample_steps=2", "optim.lr=2e-3")
    went_down(res["history"], "loss")
    assert all("text" in h and "image" in h for h in res["history"])
    ev = tmp_path / "eval"
    assert (ev / "caption_to_image.png").stat().st_size > 0
    lines = (ev / "caption_to_image.txt").read_text().splitlines()
    assert len(lines) == 10 and "zero" in lines[0] and "nine" in lines[9]
    assert len((ev / "image_to_caption.txt").read_text().splitlines()) == 10
    m = json.loads((ev / "metrics.json").read_text())
    assert {"caption_to_image_accuracy", "image_to_caption_accuracy", "caption_well_formed"} <= set(m)


def test_mixed_caption_sequence_formats():
    from tasks.mixed_caption import MixedCaptionTask
    cfg = load_config(ROOT / "configs" / "mnist_mixed_tiny.py", ["global_batch=64"])
    task = MixedCaptionTask(cfg)
    packed, _ = task.batch(0)
    idx, pos = task.indices(0)
    _, y = task.mnist("train")
    formats = []
    for i, g in enumerate(task.generators(0, pos)):
        s = task.sample(torch.zeros(1, 32, 32), int(y[idx[i]]), g)
        assert s.label is None and [type(x) for x in s.segments] == [Text, Image, Text]
        head, tail = s.segments[0].tokens.tolist(), s.segments[2].tokens.tolist()
        if head == [task.boi]:  # image -> caption
            assert tail[0] == task.eoi and tail[-1] == task.eot
            caption = task.codec.decode(tail[1:-1])
            formats.append("i2c")
        else:  # caption -> image
            assert head[-1] == task.boi and tail == [task.eoi]
            caption = task.codec.decode(head[:-1])
            formats.append("c2i")
        assert DIGITS[int(y[idx[i]])] in caption.split()
        assert caption in {tpl.format(w) for tpl in cfg.task.templates for w in DIGITS}
    assert 16 < formats.count("c2i") < 48  # 50/50 per sample
    assert packed.n_samples == 64 and bool((packed.block_label == -1).all())


def test_feed_image_equals_a_full_forward():
    """Feeding real images as clean blocks, then <eoi>: the logits after <eoi> equal one full forward
    of the packed [<boi>, image, <eoi>] sequence under the training mask."""
    from tasks.mixed_caption import MixedCaptionTask
    cfg = load_config(ROOT / "configs" / "mnist_mixed_tiny.py", ["model.depth=2"])
    task = MixedCaptionTask(cfg)
    model = randomised(ACDiT(task.model_config())).eval()
    x, _ = task.mnist("test")
    z = task.encode(x[:2])  # (2, 1, 32, 32)
    seen = []
    s = SequenceSampler(model, task.spec, 2, max_len=200, on_pass=lambda sm, inp, nc, out: seen.append(out.logits))
    s.feed_text(torch.tensor([task.boi]))
    feed_image(s, z, cfg.task.block)
    s.feed_text(torch.tensor([task.eoi]))
    s.text(1, temperature=0.0)
    cached = seen[0]  # (2, V)
    samples = [Sample([Text(torch.tensor([task.boi])), Image(z[i], block=cfg.task.block),
                       Text(torch.tensor([task.eoi]))]) for i in range(2)]
    packed = pack(samples, task.spec)
    at = torch.zeros_like(packed.tokens, dtype=torch.bool)
    for r in packed.records:
        if r.kind == "text" and r.shape == (1,) and r is packed.segments_of(r.sample)[-1]:
            at[r.row, r.clean_idx] = True
    zeros = torch.zeros(packed.n_blocks, dtype=torch.long)
    with torch.no_grad():
        full = model(model_input(packed, packed.patches, zeros, zeros), logits_at=at).logits  # (2, V)
    assert cached.abs().max() > 1e-3
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,ref", [("ucf101_acdit_xl.py", "ACDiT-XL"), ("ucf101_acdit_h.py", "ACDiT-H")])
def test_ucf101_configs_are_the_converted_paper_setting(name, ref):
    """The UCF-101 configs build the model a converted official checkpoint of that size has (on meta
    tensors), with the paper's blocking, guidance and sampling steps."""
    import argparse

    from unimodal import convert as C
    cfg = load_config(ROOT / "configs" / name)
    depth, H, heads = C.REFERENCE_MODELS[ref]
    shapes = C.reference_shapes(depth, H, 4 * H, 16, 101)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    args = argparse.Namespace(model=ref, dataset="UCF101", num_frames=16, image_size=256, patch_size=2,
                              block_size=1024, ar_len=4, vae_latent_size=4, nd_split="2_3_3")
    converted = C.convert_checkpoint({"model": sd, "args": args}, "paper.pt")
    conv = converted.config
    m, smp = conv["model"], conv["sampling"]
    for k in ("depth", "hidden_size", "num_heads", "mlp_ratio", "latent_channels", "patch_size", "num_classes",
              "rope_axes", "rope_split", "rope_max_pos", "rope_style"):
        assert getattr(cfg.model, k) == (tuple(m[k]) if isinstance(m[k], list) else m[k]), k
    t = cfg.task
    assert conv["pack"]["positions"] == t.positions
    assert smp["frames_per_block"] == t.frames_per_block and smp["cfg_scale"] == t.cfg_scale == 2.5
    assert smp["num_steps"] == t.sample_steps and smp["scheduler"] == t.scheduler
    assert smp["latent_shape"] == [t.frames, 4, t.image_size // 8, t.image_size // 8]
    assert (cfg.global_batch, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.decay_frac, cfg.ema_decay) == \
        (96, 3e-4, 0.0, 0.15, 0.9999)
    with torch.device("meta"):
        model = ACDiT(cfg.model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in converted.state_dict.items()}


from test_data import ucf_root  # noqa: E402,F401  (a small UCF-101 tree: 3 classes, mpeg4 clips)


@pytest.mark.parametrize("fvd", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ucf101_config_runs_on_a_latent_cache(tmp_path, ucf_root, fvd):
    """The UCF-101 paper config, shrunk: clips cached through a (tiny) VAE with flipped copies, a few
    training steps on the cache, evaluation with a longer-than-trained GIF (and FVD against the clips:
    I3D at 224x224 is the slow part)."""
    from diffusers import AutoencoderKL

    from test_data import load_script
    root, _ = ucf_root
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    cache = tmp_path / "cache"
    load_script("cache_latents").main(["--dataset", str(root), "--dataset-kw", '{"frames": 12, "size": 16}',
                                       "--codec", "vae", "--vae", str(tmp_path / "vae"), "--flip", "--out", str(cache)])
    cfg = load_config(ROOT / "configs" / "ucf101_acdit_xl.py", [
        "steps=3", f"out_dir={tmp_path / 'run'}", *FAST, "global_batch=3", "precision='fp32'",
        "model.depth=1", "model.hidden_size=128", "model.num_heads=2", "model.num_classes=3",
        "model.rope_max_pos=(12, 2, 2)", f"task.dataset={cache}", f"task.vae_path={tmp_path / 'vae'}",
        "task.frames=12", "task.frame_stride=1", "task.image_size=16", "task.num_classes=3", "task.eval_samples=3",
        "task.eval_batch=3", "task.sample_steps=2", "task.extend_frames=16", f"task.fvd_reference={root}",
        "task.fvd_reference_clips=3", "task.mp4=False", f"task.fvd={fvd}"])
    res = train.train(cfg, quiet=True)
    m = res["eval"]
    assert m["samples"] == 3 and m["frames"] == 12 and m["extend_frames"] == 16
    assert ("fvd" in m) == fvd and (not fvd or (math.isfinite(m["fvd"]) and m["fvd"] > 0))
    ev = tmp_path / "run" / "eval"
    assert frames_of(ev / "videos.gif") == 12 and frames_of(ev / "videos_extended.gif") == 16
    with np.load(ev / "samples.npz") as z:
        assert z["videos"].shape == (3, 12, 16, 16, 3)


@pytest.mark.parametrize("config", ["mnist_class_tiny", "moving_mnist_video_tiny"])
def test_evaluation_samples_do_not_depend_on_the_batch_they_are_drawn_in(config):
    """Sample j of an evaluation set comes from its own generator (the set's seed and j): drawn in one
    batch or cut into two, the set is the same."""
    from tasks import build_task
    cfg = load_config(ROOT / "configs" / f"{config}.py", ["task.sample_steps=2"])
    task = build_task(cfg)
    torch.manual_seed(0)
    model = randomised(task.build_model()).eval()
    with torch.no_grad():  # moderate activations: batch-size rounding differences stay small through the blocks
        for p in model.parameters():
            p.mul_(0.3)
    labels = torch.arange(3)
    whole = task.generate(model, labels, seed=1000)
    cut = torch.cat([task.generate(model, labels[:1], seed=1000), task.generate(model, labels[1:], seed=1000, first=1)])
    assert torch.allclose(whole, cut, atol=1e-3), float((whole - cut).abs().max())  # batch-size rounding only
    assert float((task.generate(model, labels[1:], seed=1000) - cut[1:]).abs().max()) > 0.05  # first counts
