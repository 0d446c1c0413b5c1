"""Datasets against independent oracles: official MNIST counts and statistics, KJV facts,
container metadata read with PyAV, source frames of transcoded clips, diffusers encodings."""
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unimodal import data
from unimodal.assets import VIDEO_ASSETS, asset_path
from unimodal.data import DataError, Skipped, build_dataset

OFFICIAL_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
OFFICIAL_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "tokenizers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- MNIST

def test_mnist_official_counts_and_statistics():
    x, y = data.mnist_arrays("train")
    tx, ty = data.mnist_arrays("test")
    assert x.shape == (60000, 28, 28) and tx.shape == (10000, 28, 28) and x.dtype == tx.dtype == np.uint8
    assert np.bincount(ty).tolist() == OFFICIAL_TEST_HIST
    assert np.bincount(y).tolist() == OFFICIAL_TRAIN_HIST
    # the normalisation constants used for MNIST everywhere: mean 0.1307, std 0.3081 of pixels/255
    assert abs(x.mean() / 255 - 0.1307) < 5e-4 and abs(x.std() / 255 - 0.3081) < 5e-4
    assert x.min() == 0 and x.max() == 255


def test_mnist_dataset_loads_offline_from_cache(monkeypatch):
    data.mnist("train"), data.mnist("test")  # builds the cache on a fresh machine

    def no_fetch(*a, **k):
        raise AssertionError("tried to fetch an archive")

    monkeypatch.setattr("unimodal.assets.subprocess.run", no_fetch)
    t = time.perf_counter()
    train, test = data.mnist("train"), data.mnist("test")
    x, y = data.mnist_arrays("train")
    assert time.perf_counter() - t < 1.0
    assert (len(train), len(test)) == (60000, 10000)
    row = train[7]
    assert row["image"].dtype == np.uint8 and row["image"].shape == (28, 28)
    assert np.array_equal(train[:50]["image"], x[:50]) and np.array_equal(train[:50]["label"], y[:50])
    assert np.bincount(test[:]["label"]).tolist() == OFFICIAL_TEST_HIST
    padded = data.mnist("test", size=32)
    assert padded[0]["image"].shape == (32, 32)
    assert np.array_equal(padded[0]["image"][2:30, 2:30], test[0]["image"])
    assert build_dataset("mnist", "test")[3]["label"] == test[3]["label"]


# ----------------------------------------------------------------------------- Moving MNIST

def test_moving_mnist_deterministic_and_labelled():
    kw = dict(num_clips=6, frames=10, size=48, digits=1)
    a, b, c = (data.moving_mnist("train", seed=s, **kw) for s in (3, 3, 4))
    va, vb, vc = a[:]["video"], b[:]["video"], c[:]["video"]
    assert va.dtype == np.uint8 and va.shape == (6, 10, 48, 48)
    assert va.tobytes() == vb.tobytes() and not np.array_equal(va, vc)
    # oracle: each frame holds an exact MNIST training digit whose official label is the clip label
    x, y = data.mnist_arrays("train")
    table = {img.tobytes(): int(lab) for img, lab in zip(x, y)}
    for clip, label in zip(va, a[:]["label"]):
        for frame in clip[[0, 5, 9]]:
            windows = np.lib.stride_tricks.sliding_window_view(frame, (28, 28)).reshape(-1, 28, 28)
            assert {table.get(w.tobytes()) for w in windows} - {None} == {int(label)}
        mass = clip.reshape(10, -1).sum(1, dtype=np.int64)
        assert (mass == mass[0]).all()  # the digit bounces and never leaves the canvas
        assert len({f.tobytes() for f in clip}) > 1  # it moves
    two = data.moving_mnist("test", num_clips=3, frames=4, size=64, digits=2)
    assert two[:]["video"].shape == (3, 4, 64, 64)
    assert (two[:]["label"] == -1).all()
    assert all(len(d) == 2 and all(0 <= int(v) <= 9 for v in d) for d in two[:]["digits"])
    with pytest.raises(ValueError, match="canvas size"):
        data.moving_mnist(size=20, num_clips=1)


# ----------------------------------------------------------------------------- text

def test_kjv_splits_and_known_facts():
    train, test, full = data.kjv("train"), data.kjv("test"), data.kjv("all")
    assert len(full) == 31103 and len(train) + len(test) == len(full)
    assert set(full.column_names) >= {"text", "book", "chapter", "verse"}
    assert full[0]["text"] == "In the beginning God created the heaven and the earth."  # Genesis 1:1
    chapters = lambda ds: set(zip(ds[:]["book"].tolist(), ds[:]["chapter"].tolist()))  # noqa: E731
    assert len(set(full[:]["book"].tolist())) == 66 and len(chapters(full)) == 1189  # books, chapters of the KJV
    assert len(chapters(test)) == 1189 // 20 and not chapters(test) & chapters(train)
    assert full[-1]["book"] == "Revelation" and (full[-1]["chapter"], full[-1]["verse"]) == (22, 21)


def test_bad_text_lines(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_bytes(b'{"text": "good one"}\n\n{"text": "bad \xff\xfe bytes"}\n{"text": ""}\nnot json\n'
                  b'{"nottext": 1}\n{"text": "good two"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: empty line"):
        data.text_file(f)
    sk = Skipped()
    ds = data.text_file(f, on_error="skip", skipped=sk)
    assert ds[:]["text"].tolist() == ["good one", "good two"] and sk.count == 5
    assert any("corpus.jsonl:3" in s and "not UTF-8" in p for s, p in sk.items)
    with pytest.raises(DataError, match="corpus.jsonl:2"):
        data.kjv(path=f)
    t = tmp_path / "plain.txt"
    t.write_bytes(b"first line\nsecond \xc3\x28 line\nthird\n")
    with pytest.raises(DataError, match=r"plain.txt:2: line is not UTF-8"):
        build_dataset(str(t))
    with pytest.raises(DataError, match="missing.txt: text file does not exist"):
        data.text_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- real video clips

@pytest.mark.parametrize("name", VIDEO_ASSETS)
def test_real_clip_decodes_as_its_container_reports(name):
    path = asset_path(name)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n, w, h, rate = s.frames, s.width, s.height, float(s.average_rate)
    video, fps = data.decode_video(path, frames=None)
    assert n > 0 and video.shape == (n, h, w, 3) and video.dtype == np.uint8
    assert fps == pytest.approx(rate)
    assert video.std() > 10  # real content, not a blank frame


def test_video_clips_dataset_options():
    ds = data.video_clips(frames=6, stride=3, start=2, size=32)
    assert ds[:]["name"].tolist() == VIDEO_ASSETS
    assert all(ds[i]["video"].shape == (6, 32, 32, 3) for i in range(len(ds)))
    path = asset_path("video_carphone_pristine")
    full, _ = data.decode_video(path, frames=None)
    part, _ = data.decode_video(path, frames=6, stride=3, start=2)
    assert np.array_equal(part, full[2:2 + 16:3])
    centre, _ = data.decode_video(path, frames=10, start="center")
    assert np.array_equal(centre, full[55:65])
    # a fractional start u begins at u x the last start that fits (a random temporal crop for a random u)
    n = len(full)
    for u in (0.0, 0.37, 0.999):
        s = int(u * (n - 28 + 1))
        assert np.array_equal(data.decode_video(path, frames=10, stride=3, start=u)[0], full[s:s + 28:3])
    # a clip shorter than the span: an error, or its frames evenly spaced
    with pytest.raises(DataError, match="decodable frames"):
        data.decode_video(path, frames=60, stride=3)
    spread, _ = data.decode_video(path, frames=60, stride=3, short="spread")
    assert np.array_equal(spread, full[np.linspace(0, n - 1, 60).round().astype(int)])
    native = data.video_clips(names=["video_carphone_pristine", "video_bikes"], frames=3)
    with av.open(str(asset_path("video_bikes"))) as c:
        hw = (c.streams.video[0].height, c.streams.video[0].width)
    assert native[0]["video"].shape == (3, 144, 176, 3) and native[1]["video"].shape == (3,) + hw + (3,)
    rect = data.video_clips(names=["video_bikes"], frames=2, size=(24, 40))
    assert rect[0]["video"].shape == (2, 24, 40, 3)


def test_bad_videos(tmp_path):
    good = asset_path("video_carphone_pristine")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(asset_path("video_bikes").read_bytes()[:200_000])
    with pytest.raises(DataError, match="cut.mp4.*(corrupt, truncated|truncated)"):
        data.decode_video(cut)
    text = tmp_path / "notes.avi"
    text.write_text("not a video")
    with pytest.raises(DataError, match="notes.avi: cannot open as a video"):
        data.decode_video(text)
    with pytest.raises(DataError, match="has only 120 decodable frames"):
        data.decode_video(good, frames=200)
    with pytest.raises(DataError, match="gone.mp4: video file does not exist"):
        data.decode_video(tmp_path / "gone.mp4")
    sk = Skipped()
    ds = data.video_clips(names=[str(good), str(cut), str(text)], frames=4, on_error="skip", skipped=sk)
    assert len(ds) == 1 and sk.count == 2 and {Path(s).name for s, _ in sk.items} == {"cut.mp4", "notes.avi"}
    with pytest.raises(DataError, match="cut.mp4"):
        data.video_clips(names=[str(good), str(cut)], frames=4)


# ----------------------------------------------------------------------------- UCF-101 layout

UCF_CLASSES = {"ApplyEyeMakeup": "video_carphone_pristine", "Biking": "video_bikes",
               "CarPhone": "video_carphone_distorted"}


def write_avi(path, frames, fps=25):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    """A small UCF-101: <root>/<Class>/v_<Class>_gXX_c01.avi + ucfTrainTestlist (CRLF, as shipped)."""
    root = tmp_path_factory.mktemp("ucf") / "UCF-101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes(b"".join(f"{i} {c}\r\n".encode() for i, c in enumerate(UCF_CLASSES, 1)))
    train, test, sources = [], [], {}
    for i, (cls, asset) in enumerate(UCF_CLASSES.items(), 1):
        frames, _ = data.decode_video(asset_path(asset), frames=40, size=(64, 96))  # (40,64,96,3)
        (root / cls).mkdir()
        for g, part in ((1, frames[:20]), (2, frames[20:])):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            write_avi(root / rel, part)
            sources[rel] = part
            (test if g == 1 else train).append(f"{rel} {i}" if g == 2 else rel)
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")
    return root, sources


def test_ucf101_reads_the_standard_layout(ucf_root):
    root, sources = ucf_root
    ds = data.ucf101(root, "train", frames=8, stride=2, size=(64, 96))
    assert len(ds) == 3 and ds.features["label"].names == list(UCF_CLASSES)
    for i, cls in enumerate(UCF_CLASSES):
        row = ds[i]
        assert row["label"] == i  # classInd index - 1
        assert row["video"].shape == (8, 64, 96, 3) and row["video"].dtype == np.uint8
        src = sources[f"{cls}/v_{cls}_g02_c01.avi"][0:16:2]
        assert np.abs(row["video"].astype(float) - src).mean() < 12  # lossy mpeg4, same frames
        with av.open(row["path"]) as c:
            assert c.streams.video[0].frames == 20
    test = data.ucf101(root, "test", frames=16, size=32, eager=True)
    assert len(test) == 3 and test[:]["video"].shape == (3, 16, 32, 32, 3)
    assert test[:]["label"].tolist() == [0, 1, 2]
    lazy = data.ucf101(root, "test", frames=16, size=32)
    assert np.array_equal(lazy[1]["video"], test[1]["video"])
    batch = next(iter(torch.utils.data.DataLoader(lazy, batch_size=2)))
    assert batch["video"].shape == (2, 16, 32, 32, 3) and batch["video"].dtype == torch.uint8
    assert len(build_dataset(str(root), "test", frames=4, size=16)) == 3
    # 16 frames at stride 2 span 31 of these 20-frame clips: spread over the clip, not an error mid-epoch
    short = data.ucf101(root, "train", frames=16, stride=2, size=32)
    assert short[0]["video"].shape == (16, 32, 32, 3)
    with pytest.raises(DataError, match="decodable frames"):
        data.ucf101(root, "train", frames=16, stride=2, size=32, short="raise")[0]


def test_video_training_crops_each_clip_from_a_random_first_frame(ucf_root):
    """UCF-101 read from the videos: each visit draws its clip's first frame from the sample's generator
    (temporal_crop="random"); "start" takes frame 0, as the loader (and a latent cache) does."""
    from tasks import build_task
    from unimodal.config import load_config
    root, _ = ucf_root
    over = [f"task.dataset={root}", "task.frames=8", "task.image_size=32", "task.num_classes=3", "task.hflip=False"]
    task = build_task(load_config(ROOT / "configs/moving_mnist_video_tiny.py", over))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x, y, is_latent = task._examples([0, 0, 1], gens)
    assert x.shape == (3, 8, 32, 32, 3) and y.tolist() == [0, 0, 1] and not is_latent
    path = data.ucf101(root, "train", frames=8, size=32).with_format(None)[0]["path"]
    for i, seed in enumerate((1, 2)):
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))  # the draw after none (no flips)
        want = data.decode_video(path, 8, 1, u, 32)[0]
        assert np.array_equal(x[i].numpy(), want)
    assert not np.array_equal(x[0].numpy(), x[1].numpy())  # two visits, two crops
    start = build_task(load_config(ROOT / "configs/moving_mnist_video_tiny.py", over + ["task.temporal_crop=start"]))
    x0, _, _ = start._examples([0], [torch.Generator().manual_seed(1)])
    assert np.array_equal(x0[0].numpy(), data.ucf101(root, "train", frames=8, size=32)[0]["video"])


def test_ucf101_bad_inputs(ucf_root, tmp_path):
    root = tmp_path / "UCF-101"
    shutil.copytree(ucf_root[0], root)
    bad = root / "Biking/v_Biking_g02_c01.avi"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated
    (root / "CarPhone/v_CarPhone_g02_c01.avi").unlink()  # listed but missing
    ds = data.ucf101(root, "train", frames=8, size=32)
    assert ds[0]["video"].shape == (8, 32, 32, 3)
    with pytest.raises(DataError, match="v_Biking_g02_c01.avi"):
        ds[1]
    with pytest.raises(DataError, match="v_CarPhone_g02_c01.avi: video file does not exist"):
        ds[2]
    sk = Skipped()
    eager = data.ucf101(root, "train", frames=8, size=32, eager=True, on_error="skip", skipped=sk)
    assert len(eager) == 1 and sk.count == 2
    with pytest.raises(ValueError, match="eager=True"):
        data.ucf101(root, "train", on_error="skip")
    with pytest.raises(DataError, match="nowhere: UCF-101 directory does not exist"):
        data.ucf101(tmp_path / "nowhere")
    (root / "ucfTrainTestlist/classInd.txt").write_text("1 ApplyEyeMakeup\nBiking two\n")
    with pytest.raises(DataError, match=r"classInd.txt:2: expected '<index> <ClassName>'"):
        data.ucf101(root)
    shutil.rmtree(root / "ucfTrainTestlist")
    with pytest.raises(DataError, match="no ucfTrainTestlist/classInd.txt"):
        data.ucf101(root)


# ----------------------------------------------------------------------------- images

def test_adm_center_crop_geometry():
    img = Image.new("RGB", (1024, 512), (255, 0, 0))
    img.paste((0, 0, 255), (512, 0, 1024, 512))  # left half red, right half blue
    arr = data.center_crop_arr(img, 256)  # box to 512x256, then the centre 256 columns
    assert arr.shape == (256, 256, 3)
    assert (arr[:, :120] == [255, 0, 0]).all() and (arr[:, 136:] == [0, 0, 255]).all()
    tall = Image.new("RGB", (300, 900), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 300, 450))  # top half white
    arr = data.center_crop_arr(tall, 100)  # box to 150x450, bicubic to 100x300, centre rows 100..199
    assert arr.shape == (100, 100, 3)
    assert (arr[:45] == 255).all() and (arr[55:] == 0).all()


def make_image_folder(root):
    rng = np.random.default_rng(0)
    (root / "train/n01440764").mkdir(parents=True)
    (root / "train/n01443537").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(root / "train/n01440764/a.JPEG")
    Image.fromarray(rng.integers(0, 255, (320, 256), dtype=np.uint8)).save(root / "train/n01443537/b.png")
    return [root / "train/n01440764/a.JPEG", root / "train/n01443537/b.png"]


def test_imagenet_folder_and_huggingface(tmp_path):
    files = make_image_folder(tmp_path / "in")
    ds = data.imagenet(tmp_path / "in", "train")
    assert len(ds) == 2 and ds.features["label"].names == ["n01440764", "n01443537"]
    want = [data.center_crop_arr(Image.open(f).convert("RGB"), 256).transpose(2, 0, 1) for f in files]
    for i in range(2):
        row = ds[i]
        assert row["image"].shape == (3, 256, 256) and row["image"].dtype == np.uint8 and row["label"] == i
        assert np.array_equal(row["image"], want[i])
    eager = data.imagenet(tmp_path / "in", "train", eager=True)
    assert np.array_equal(eager[:]["image"], np.stack(want))
    hf = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [0, 1]})
    hf = hf.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "hf"))
    from_hf = data.imagenet(tmp_path / "hf", "train")
    assert np.array_equal(from_hf[1]["image"], want[1]) and from_hf[1]["label"] == 1
    assert np.array_equal(build_dataset("hf_images", "train", name_or_path=str(tmp_path / "hf"), eager=True)[:]["image"],
                          np.stack(want))
    with pytest.raises(DataError, match="no split 'validation'"):
        data.imagenet(tmp_path / "hf", "validation")
    with pytest.raises(DataError, match="allow_download=True"):
        data.hf_images("someone/imagenet-1k")
    assert build_dataset("imagenet", "train", root=str(tmp_path / "in"), size=64)[0]["image"].shape == (3, 64, 64)
    # a split the folder lacks, beside the ones it has, is refused (not read as two classes 'train', 'val')
    (tmp_path / "in" / "val" / "n01440764").mkdir(parents=True)
    Image.open(files[0]).save(tmp_path / "in" / "val" / "n01440764" / "v.png")
    with pytest.raises(DataError, match="no 'validation' folder.*train, val"):
        data.imagenet(tmp_path / "in", "validation")
    # a folder of class folders is the split it is named as
    assert len(data.imagenet(tmp_path / "in" / "val", "val", size=64)) == 1
    # class folders with their images in subfolders are still class folders
    (tmp_path / "nested" / "train" / "cls_a" / "sub").mkdir(parents=True)
    (tmp_path / "nested" / "train" / "cls_b").mkdir(parents=True)
    Image.open(files[0]).save(tmp_path / "nested" / "train" / "cls_a" / "sub" / "x.png")
    Image.open(files[1]).save(tmp_path / "nested" / "train" / "cls_b" / "y.png")
    assert data.imagenet(tmp_path / "nested", "train", size=64)[:]["label"].tolist() == [0, 1]
    # a dataset snapshot's data/ of parquet files is read as a HuggingFace dataset, not as one class
    (tmp_path / "snap" / "data").mkdir(parents=True)
    hf.to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    snap = data.imagenet(tmp_path / "snap", "train")
    assert len(snap) == 2 and np.array_equal(snap[1]["image"], want[1])


def test_bad_images(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    cls = root / "train/n01440764"
    (cls / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (cls / "truncated.JPEG").write_bytes((cls / "a.JPEG").read_bytes()[:2000])
    Image.new("RGB", (30, 20)).save(cls / "small.png")
    ds = data.image_folder(root, "train", size=64)
    names = [Path(p).name for p in ds.with_format(None)[:]["path"]]
    with pytest.raises(DataError, match="corrupt.jpg: not a readable image"):
        ds[names.index("corrupt.jpg")]
    with pytest.raises(DataError, match="truncated.JPEG: not a readable image"):
        ds[names.index("truncated.JPEG")]
    sk = Skipped()
    eager = data.image_folder(root, "train", size=64, eager=True, on_error="skip", skipped=sk)
    assert len(eager) == 3 and sk.count == 2
    with pytest.raises(DataError, match="small.png: image is 30x20, expected 64x64"):
        data.load_image(cls / "small.png", 64, crop="none")
    sk = Skipped()
    exact = data.image_folder(root, "train", size=64, crop="none", eager=True, on_error="skip", skipped=sk)
    assert len(exact) == 0 and sk.count == 5  # every image here has the wrong size or is broken
    with pytest.raises(DataError, match="nowhere: image directory does not exist"):
        data.image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere: ImageNet directory does not exist"):
        data.imagenet(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat/x.png")
    with pytest.raises(DataError, match="no class subfolders"):
        data.image_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="eager=True"):
        data.image_folder(root, on_error="skip")
    with pytest.raises(DataError, match="unknown dataset 'cifar-1000'"):
        build_dataset("cifar-1000")


# ----------------------------------------------------------------------------- latent caches

def test_cached_latents_equal_on_the_fly_encoding(tmp_path):
    from diffusers import AutoencoderKL

    from unimodal.codecs import PixelCodec, VAECodec

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    script = load_script("cache_latents")
    out = tmp_path / "cache"
    info = script.main(["--dataset", "mnist", "--split", "test", "--dataset-kw", '{"size": 32}', "--codec", "vae",
                        "--vae", str(tmp_path / "vae"), "--flip", "--limit", "40", "--batch-size", "16",
                        "--shard-size", "24", "--out", str(out)])
    assert info["count"] == 40 and len(info["shards"]) == 2
    ds = data.load_latent_cache(out)
    x, y = data.mnist_arrays("test")
    pixels = data.image_batch(np.pad(x[:40], ((0, 0), (2, 2), (2, 2))))  # (40,1,32,32)
    codec = VAECodec(tmp_path / "vae")
    torch.testing.assert_close(torch.from_numpy(ds[:]["latent"]), codec.encode(pixels), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ds[:]["latent_flip"]), codec.encode(pixels.flip(-1)), rtol=0,
                               atol=1e-5)
    assert ds[:]["latent"].shape == (40, 4, 8, 8) and np.array_equal(ds[:]["label"], y[:40])
    assert np.array_equal(data.LatentDataset(out, flip_p=1.0)[3][0].numpy(), ds[3]["latent_flip"])
    assert np.array_equal(data.LatentDataset(out, flip_p=0.0)[3][0].numpy(), ds[3]["latent"])
    assert build_dataset(str(out))[5]["label"] == y[5]
    with pytest.raises(SystemExit, match="--overwrite"):
        script.main(["--dataset", "mnist", "--codec", "pixel", "--out", str(out)])

    vid = script.main(["--dataset", "moving_mnist", "--split", "test", "--codec", "pixel", "--out", str(tmp_path / "v"),
                       "--dataset-kw", '{"num_clips": 3, "frames": 4, "size": 32, "digits": 1}'])
    clips = data.moving_mnist("test", num_clips=3, frames=4, size=32, digits=1)
    cached = data.load_latent_cache(tmp_path / "v")
    assert vid["latent_channels"] == PixelCodec(1).latent_channels
    assert np.array_equal(cached[:]["latent"], data.video_batch(clips[:]["video"]).numpy())  # (3,4,1,32,32)
    with pytest.raises(DataError, match="not a latent cache"):
        data.load_latent_cache(tmp_path)


def test_image_training_flips_images_before_encoding_or_takes_the_cached_flip(tmp_path):
    """hflip in the image generation task: an image is flipped before the VAE encodes it (the VAE is not
    flip-equivariant, so flipping its latents would be another augmentation); from a latent cache the
    flipped example is the cached `latent_flip`."""
    from diffusers import AutoencoderKL

    from tasks import build_task
    from unimodal.codecs import VAECodec
    from unimodal.config import load_config

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    out = tmp_path / "cache"
    load_script("cache_latents").main(["--dataset", "mnist", "--split", "train", "--dataset-kw", '{"size": 32}',
                                       "--codec", "vae", "--vae", str(tmp_path / "vae"), "--flip", "--limit", "8",
                                       "--out", str(out)])
    cached = data.load_latent_cache(out)[:8]
    idx, flip = list(range(8)), torch.tensor([True, False] * 4)
    codec = VAECodec(tmp_path / "vae")
    x, labels = data.mnist_arrays("train")
    pixels = data.image_batch(np.pad(x[:8], ((0, 0), (2, 2), (2, 2))))  # (8, 1, 32, 32)
    want = torch.where(flip[:, None, None, None], codec.encode(pixels.flip(-1)), codec.encode(pixels))
    assert float((codec.encode(pixels.flip(-1)) - codec.encode(pixels).flip(-1)).abs().max()) > 1e-2  # not equivariant
    for dataset in ("mnist", str(out)):
        cfg = load_config(ROOT / "configs/mnist_class_tiny.py", [f"task.dataset={dataset}", "task.codec=vae",
                                                                 f"task.vae_path={tmp_path / 'vae'}", "task.hflip=true",
                                                                 "model.latent_channels=4",
                                                                 "task.image_size=32"])
        z, y = build_task(cfg)._train_latents(idx, flip)
        assert y.tolist() == labels[:8].tolist()
        if dataset == "mnist":
            torch.testing.assert_close(z, want, rtol=0, atol=1e-5)
        else:
            expect = np.where(flip[:, None, None, None].numpy(), cached["latent_flip"], cached["latent"])
            assert np.array_equal(z.numpy(), expect)
    # a cache is decoded by the task's VAE: another VAE (other weights, or another scaling) is refused
    for name, factor, match in (("other", 0.5, "VAE .*sha256"), ("scaled", 0.25, "scaling_factor 0.5")):
        torch.manual_seed(1)
        AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16, 16),
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      layers_per_block=1, norm_num_groups=8, scaling_factor=factor).save_pretrained(tmp_path / name)
        cfg = load_config(ROOT / "configs/mnist_class_tiny.py", [f"task.dataset={out}", "task.codec=vae",
                                                                 f"task.vae_path={tmp_path / name}", "task.image_size=32",
                                                                 "model.latent_channels=4"])
        with pytest.raises(DataError, match=match):
            build_task(cfg).dataset_size()


def test_a_killed_caching_run_continues_from_its_last_shard(tmp_path, monkeypatch):
    script = load_script("cache_latents")
    args = ["--dataset", "mnist", "--split", "test", "--dataset-kw", '{"size": 32}', "--codec", "pixel", "--flip",
            "--limit", "40", "--batch-size", "8", "--shard-size", "16"]
    whole = script.main(args + ["--out", str(tmp_path / "whole")])
    real, seen = script._fetch, []

    def killed(ds, col, lo, hi, on_error, skipped):
        seen.append(lo)
        if lo == 24 and seen.count(24) == 1:
            raise KeyboardInterrupt("killed")
        return real(ds, col, lo, hi, on_error, skipped)
    monkeypatch.setattr(script, "_fetch", killed)
    with pytest.raises(KeyboardInterrupt):
        script.main(args + ["--out", str(tmp_path / "part")])
    assert not (tmp_path / "part" / "meta.json").exists()
    again = script.main(args + ["--out", str(tmp_path / "part")])
    assert seen == [0, 8, 16, 24, 16, 24, 32]  # the second run starts after the last shard written (rows 0-15)
    assert again["count"] == whole["count"] == 40 and again["shards"] == whole["shards"]
    a, b = data.load_latent_cache(tmp_path / "whole")[:], data.load_latent_cache(tmp_path / "part")[:]
    for k in ("latent", "latent_flip", "label"):
        assert np.array_equal(a[k], b[k]), k
    assert not (tmp_path / "part" / "progress.json").exists()
    (tmp_path / "third").mkdir()  # a partial cache is continued only as it was begun
    (tmp_path / "third" / "progress.json").write_text(json.dumps(
        {"settings": {"n": 1}, "shards": [], "count": 0, "next": 0, "skipped": [], "input_shape": None}))
    with pytest.raises(SystemExit, match="other settings"):
        script.main(args + ["--out", str(tmp_path / "third")])


def test_cache_latents_skips_bad_images(tmp_path):
    root = tmp_path / "imgs"
    make_image_folder(root)
    (root / "train/n01443537/zz_corrupt.png").write_bytes(b"\x89PNG broken")
    script = load_script("cache_latents")
    info = script.main(["--dataset", "image_folder", "--dataset-kw", json.dumps({"root": str(root), "size": 16}),
                        "--codec", "pixel", "--on-error", "skip", "--out", str(tmp_path / "c")])
    assert info["count"] == 2 and len(info["skipped"]) == 1 and "zz_corrupt.png" in info["skipped"][0][1]
    assert data.load_latent_cache(tmp_path / "c")[:]["latent"].shape == (2, 3, 16, 16)
    # the dataset named by its path, as --help allows
    info = script.main(["--dataset", str(root), "--dataset-kw", json.dumps({"size": 16}), "--codec", "pixel",
                        "--on-error", "skip", "--out", str(tmp_path / "p")])
    assert info["count"] == 2 and len(info["skipped"]) == 1 and info["input_shape"] == [3, 16, 16]


@pytest.mark.parametrize("name", ["train_vae", "train_bpe", "cache_latents"])
def test_scripts_explain_themselves(name, capsys):
    with pytest.raises(SystemExit) as e:
        load_script(name).parse_args(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    assert not (ROOT / "tokenizers" / "__init__.py").exists()  # would shadow the tokenizers package


@pytest.mark.parametrize("script,args,says", [
    ("train_bpe", ["--vocab-size", "-5"], "--vocab-size: must be at least 1"),
    ("train_bpe", ["--input", "/nowhere/corpus.txt"], "unknown dataset '/nowhere/corpus.txt'"),
    ("cache_latents", ["--out", "OUT", "--dataset-kw", "{bad"], "--dataset-kw '{bad' is not a JSON object"),
    ("train_vae", ["--steps", "0"], "--steps: must be at least 1"),
])
def test_scripts_report_bad_input_in_one_line(script, args, says, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    res = subprocess.run([sys.executable, f"tokenizers/{script}.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
