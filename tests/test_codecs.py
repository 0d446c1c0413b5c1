"""Codecs against independent oracles: GPT-2's published ids and its reference BPE algorithm,
diffusers' own AutoencoderKL forward, per-frame encoding."""
import json
from functools import lru_cache

import numpy as np
import pytest
import regex
import torch

from unimodal.assets import asset_path
from unimodal.codecs import CodecError, PixelCodec, TextCodec, VAECodec, gpt2_tokenizer, train_bpe
from unimodal.data import kjv


# ----------------------------------------------------------------------------- GPT-2 BPE

class ReferenceGPT2:
    """OpenAI's gpt-2 src/encoder.py algorithm (bytes_to_unicode + greedy lowest-rank merges)."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self):
        self.encoder = json.loads(asset_path("gpt2_encoder").read_text())
        merges = asset_path("gpt2_merges").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))

    @lru_cache(maxsize=None)
    def bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        ids = []
        for tok in self.PAT.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok))
        return ids


@pytest.fixture(scope="module")
def gpt2():
    return TextCodec.gpt2()


@pytest.fixture(scope="module")
def kjv_text():
    return [str(t) for t in kjv("all")[:]["text"]]


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]  # the ids published for GPT-2
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("a<|endoftext|>b")[1] == 50256  # special, never split into pieces
    assert gpt2_tokenizer().token_to_id("<|endoftext|>") == 50256


def test_gpt2_matches_reference_bpe(gpt2, kjv_text):
    ref = ReferenceGPT2()
    samples = kjv_text[::97] + ["  leading spaces\n\ttabs", "don't we'll I'm", "naïve café ünïcödé 東京 🙂",
                                "numbers 12345 3.14", "trailing   "]
    assert [gpt2.encode(s) for s in samples] == [ref.encode(s) for s in samples]


def test_gpt2_roundtrips_whole_kjv(gpt2, kjv_text):
    text = "\n".join(kjv_text)
    ids = gpt2.encode(text)
    assert len(ids) > 900_000
    assert gpt2.decode(ids) == text


def test_special_tokens_stable_ids():
    a = TextCodec.gpt2(["<boi>", "<eoi>"])
    b = TextCodec.gpt2()
    ids = b.add_special_tokens(["<boi>", "<eoi>"])
    assert ids == {"<boi>": 50257, "<eoi>": 50258} == {t: a.token_id(t) for t in ("<boi>", "<eoi>")}
    assert b.add_special_tokens(["<eoi>"]) == {"<eoi>": 50258} and b.vocab_size == 50259
    ids = a.encode("A cat<boi><eoi>")
    assert ids[-2:] == [50257, 50258] and a.decode(ids) == "A cat<boi><eoi>"
    with pytest.raises(CodecError, match="<nope>"):
        a.token_id("<nope>")
    with pytest.raises(CodecError, match="outside the vocabulary"):
        a.decode([50259])


def test_trained_bpe_saves_and_loads(tmp_path, kjv_text):
    tok = train_bpe(kjv_text[:3000], vocab_size=400, special_tokens=["<|endoftext|>", "<boi>"], show_progress=False)
    path = tmp_path / "tokenizer.json"
    TextCodec(tok).save(path)
    codec = TextCodec.from_file(tmp_path, specials=["<eoi>"])
    assert codec.vocab_size == 401 and codec.token_id("<|endoftext|>") == 0 and codec.token_id("<eoi>") == 400
    for s in kjv_text[-50:] + ["unseen ünïcode 🙂 text"]:
        assert codec.decode(codec.encode(s)) == s
    assert len(codec.encode(kjv_text[0])) < len(kjv_text[0].encode())  # it learned merges
    with pytest.raises(CodecError, match="does not exist"):
        TextCodec.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CodecError, match="bad.json"):
        TextCodec.from_file(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- pixel codec

def test_pixel_codec_identity():
    c = PixelCodec(3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    v = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    assert torch.equal(c.decode(c.encode(x)), x) and torch.equal(c.decode(c.encode(v)), v)
    assert (c.latent_channels, c.downsample) == (3, 1)
    with pytest.raises(CodecError, match=r"\[-1, 1\]"):
        c.encode(x * 3)
    with pytest.raises(CodecError, match="float"):
        c.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(CodecError, match="channels"):
        c.encode(torch.zeros(1, 1, 8, 8))


# ----------------------------------------------------------------------------- VAE codec

def tiny_vae(in_channels=3, shift=None, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=16,
                        scaling_factor=0.37, shift_factor=shift)
    return vae.eval()


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = tiny_vae(shift=0.25)
    vae.save_pretrained(d)
    return vae, d


def test_vae_save_load_identical(saved_vae):
    vae, d = saved_vae
    assert (d / "diffusion_pytorch_model.safetensors").exists()
    codec = VAECodec(d)
    assert (codec.latent_channels, codec.downsample, codec.in_channels) == (4, 4, 3)
    assert (codec.scaling_factor, codec.shift_factor) == (pytest.approx(0.37), pytest.approx(0.25))
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # diffusers itself, on the in-memory model
        want_z = (mean - 0.25) * 0.37
        want_x = vae.decode(mean).sample.clamp(-1, 1)
    z = codec.encode(x)  # (5,4,4,4)
    assert z.shape == (5, 4, 4, 4)
    torch.testing.assert_close(z, want_z, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.decode(z), want_x, rtol=0, atol=1e-5)


def test_vae_video_per_frame_and_chunks(saved_vae):
    _, d = saved_vae
    big, small = VAECodec(d, chunk_size=64), VAECodec(d, chunk_size=3)
    v = torch.rand(2, 5, 3, 16, 16) * 2 - 1  # (N,T,C,H,W)
    z = small.encode(v)
    assert z.shape == (2, 5, 4, 4, 4)
    frames = torch.stack([torch.cat([big.encode(v[n, t:t + 1]) for t in range(5)]) for n in range(2)])
    torch.testing.assert_close(z, frames, rtol=0, atol=1e-5)
    assert small.decode(z).shape == v.shape


def test_vae_sampling_uses_generator(saved_vae):
    _, d = saved_vae
    c = VAECodec(d, sample=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = c.encode(x, generator=torch.Generator().manual_seed(1))
    b = c.encode(x, generator=torch.Generator().manual_seed(1))
    m = VAECodec(d).encode(x)
    assert torch.equal(a, b) and not torch.allclose(a, m)


def test_vae_bad_directories(tmp_path, saved_vae):
    with pytest.raises(CodecError, match="(?s)does not exist.*stabilityai/sd-vae-ft-ema") as e:
        VAECodec(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="no config.json"):
        VAECodec(tmp_path / "empty")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CodecError, match="UNet2DModel"):
        VAECodec(other)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((saved_vae[1] / "config.json").read_text())
    with pytest.raises(CodecError, match="no diffusion_pytorch_model"):
        VAECodec(noweights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((saved_vae[1] / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CodecError, match="could not load"):
        VAECodec(broken)
    c = VAECodec(saved_vae[1])
    with pytest.raises(CodecError, match="3 channels"):
        c.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(CodecError, match="divisible"):
        c.encode(torch.zeros(1, 3, 18, 18))


def test_vae_pipeline_folder_subfolder(tmp_path, saved_vae):
    vae, _ = saved_vae
    vae.save_pretrained(tmp_path / "vae")  # a Stable Diffusion pipeline keeps its VAE in vae/
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(VAECodec(tmp_path).encode(x), VAECodec(tmp_path / "vae").encode(x))


# ----------------------------------------------------------------------------- scripts

def load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tokenizers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_vae_script_tiny_run(tmp_path):
    from unimodal.data import _pad, image_batch, mnist_arrays

    out = tmp_path / "vae"
    m = load_script("train_vae").main(["--steps", "3", "--block-out-channels", "8,16,16", "--batch-size", "8",
                                       "--scale-images", "256", "--eval-images", "64", "--out", str(out)])
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / "metrics.json").exists()
    codec = VAECodec(out)
    assert codec.scaling_factor == pytest.approx(m["scaling_factor"]) and m["latent_shape"] == [4, 8, 8]
    x, _ = mnist_arrays("train")
    z = codec.encode(image_batch(_pad(x[-512:], 32)))  # other images than the ones that set the scale
    assert 0.7 < z.std().item() < 1.4  # scaling_factor = 1 / std of the latents
    tx, _ = mnist_arrays("test")
    rec = codec.decode(codec.encode(image_batch(_pad(tx[:64], 32))))[:, 0, 2:30, 2:30]
    rec = ((rec + 1) * 127.5).round().clamp(0, 255).numpy()
    mse = ((rec - tx[:64].astype(np.float64)) ** 2).reshape(64, -1).mean(1)
    assert m["psnr_test"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), abs=1e-6)


def test_train_bpe_script(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(str(t) for t in kjv("all")[:2000]["text"]) + "\n")
    stats = load_script("train_bpe").main(["--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path)])
    assert stats["test_roundtrip_exact"] and stats["vocab_size"] == 300
    codec = TextCodec.from_file(tmp_path / "tokenizer.json")
    assert codec.token_id("<|endoftext|>") == 0 and codec.token_id("<boi>") == 1
    assert codec.decode(codec.encode("And God said")) == "And God said"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[:10] + ["", ""] + lines[10:]) + "\n")  # two bad lines, counted once each
    stats = load_script("train_bpe").main(["--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "s"),
                                           "--on-error", "skip"])
    assert stats["skipped"] == 2
