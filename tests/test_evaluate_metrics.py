"""Image-quality maths against closed forms, and the weights' save/load path (tiny stand-ins)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from t2id.errors import UserError
from t2id.evaluate import metrics
from t2id.clip_vocab import clip_vocab_and_merges
from t2id.evaluate.clip_score import ClipScorer, build_tiny_clip, check_clip_source
from t2id.evaluate.features import (
    IS_CLASSES,
    POOL3_DIM,
    build_tiny_inception,
    extract_features,
    load_inception,
    resolve_inception,
)
from t2id.evaluate.weights import upload_path

PROMPT = "High-resolution ultrasound scan of the human vocal fold"


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """Independent of scipy.sqrtm: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2) via symmetric eigh."""
    w, v = np.linalg.eigh(s1)
    s1_half = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(s1_half @ s2 @ s1_half)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_fid_from_stats_matches_closed_form_for_non_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1.0
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # the case where naive formulas go wrong
    assert metrics.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=1e-8)
    # Diagonal covariances: sum (sqrt a - sqrt b)^2 + ||dmu||^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    expected = 1.0 + 1.0 + 1.0 + 3 * 0.5 ** 2
    got = metrics.fid_from_stats(np.zeros(3), np.diag(a), np.full(3, 0.5), np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_sampled_gaussians_approaches_closed_form():
    rng = np.random.default_rng(1)
    d, n = 4, 40_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = _closed_form_fid(mu1, s1, mu2, s2)
    assert metrics.fid(x, y) == pytest.approx(expected, rel=0.03)


def test_low_rank_fid_equals_scipy_sqrtm_route():
    """Fewer images than dims (the real case: ~300 images, 2048 dims) uses the nuclear-norm identity."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 64)), rng.normal(loc=0.3, size=(20, 64)) * 1.5
    via_stats = metrics.fid_from_stats(*metrics.gaussian_stats(x), *metrics.gaussian_stats(y))
    assert metrics.fid(x, y) == pytest.approx(via_stats, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 32))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(x, x + 0.5) == pytest.approx(32 * 0.25, rel=1e-6)  # pure mean shift: ||dmu||^2


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = metrics.kid(x, y, subsets=50, subset_size=100, seed=0)
    shifted = metrics.kid(x, y + 1.0, subsets=50, subset_size=100, seed=0)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 10 * max(abs(same.mean), same.std)
    # subset size is capped at the smaller set; the result is seeded
    capped = metrics.kid(x[:40], y, subsets=5, subset_size=1000, seed=1)
    assert capped.subset_size == 40
    assert capped == metrics.kid(x[:40], y, subsets=5, subset_size=1000, seed=1)


def test_kid_unbiased_estimator_matches_direct_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.2
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    result = metrics.kid(x, y, subsets=1, subset_size=7, seed=0)  # kernels computed per subset
    assert result.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    # several full-size subsets are permutations of the sets: same value, via the precomputed kernels
    several = metrics.kid(x, y, subsets=4, subset_size=7, seed=0)
    assert several.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and several.std < 1e-12


def test_inception_score_of_uniform_and_confident_predictions():
    uniform = np.zeros((50, 10))
    assert metrics.inception_score(uniform, splits=5).mean == pytest.approx(1.0, abs=1e-9)
    k = 10
    confident = np.full((100, k), -50.0)
    confident[np.arange(100), np.arange(100) % k] = 50.0  # one-hot, every class equally often
    one_split = metrics.inception_score(confident, splits=1)
    assert one_split.mean == pytest.approx(k, rel=1e-6) and one_split.std == 0.0
    # collapsed (all predict class 0, confidently): no diversity, IS = 1
    collapsed = np.full((40, k), -50.0)
    collapsed[:, 0] = 50.0
    assert metrics.inception_score(collapsed, splits=4).mean == pytest.approx(1.0, abs=1e-6)
    # torch-fidelity's rule: exactly the splits asked for (never silently fewer); too few images is an error
    assert metrics.inception_score(np.zeros((300, 4)), splits=10).splits == 10
    assert metrics.inception_score(uniform[:25], splits=10).splits == 10
    with pytest.raises(ValueError, match="3 image\\(s\\) for 10 splits"):
        metrics.inception_score(uniform[:3], splits=10)


def _torch_fidelity_isc(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """torch-fidelity's isc_featuresdict_to_metric, transcribed (its np.std is ddof=0)."""
    n = logits.shape[0]
    logits = logits[np.random.RandomState(seed).permutation(n)].astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        pc, lpc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        q = pc.mean(axis=0, keepdims=True)
        scores.append(float(np.exp((pc * (lpc - np.log(q))).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_follows_torch_fidelity_splits():
    # The case: 50 images, 10 splits. Capping at n/10 gave 5 splits and a different score.
    logits = np.random.default_rng(0).normal(0, 3, (50, 20))
    mean_tf, std_tf = _torch_fidelity_isc(logits, 10, seed=7)
    score = metrics.inception_score(logits, splits=10, seed=7)
    assert score.splits == 10 and score.mean == pytest.approx(mean_tf, rel=1e-12)
    assert score.std == pytest.approx(std_tf * np.sqrt(10 / 9), rel=1e-12)  # ddof=1
    assert metrics.inception_score(logits, splits=5, seed=7).mean != pytest.approx(score.mean, rel=1e-3)


def test_clip_scores_are_clamped_cosines():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(metrics.clip_scores(img, txt), [100.0, 0.0, 100 / math.sqrt(2)])


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dims differ"):
        metrics.kid(np.zeros((5, 3)), np.zeros((5, 4)))


# ------------------------------------------------------------------ weights: tiny stand-ins, same path
def _images(n: int, size: int = 96, seed: int = 0, bright: float = 0.0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(100 + bright, 40, (size, size)), 0, 255).astype(np.uint8))
            for _ in range(n)]


def test_tiny_inception_round_trips_through_local_file_and_s3(tmp_path, s3_bucket, s3_server):
    weights = build_tiny_inception(tmp_path / "inception.pt", seed=0)
    uri = upload_path(weights, f"s3://{s3_bucket}/models/inception.pt", endpoint_url=s3_server)
    local = resolve_inception(str(weights), tmp_path / "cache")
    from_s3 = resolve_inception(uri, tmp_path / "cache", endpoint_url=s3_server)
    assert from_s3 != local and from_s3.read_bytes() == weights.read_bytes()
    assert resolve_inception(uri, tmp_path / "cache", endpoint_url=s3_server) == from_s3  # cached by sha256

    images = _images(5) + _images(2, size=64, seed=1)  # two sizes: batched by size, order kept
    pool3_a, logits_a = extract_features(load_inception(local), images, batch_size=2)
    pool3_b, logits_b = extract_features(load_inception(from_s3), images[::-1], batch_size=3)
    assert pool3_a.shape == (7, POOL3_DIM) and logits_a.shape == (7, IS_CLASSES)
    assert (pool3_a >= 0).all() and np.isfinite(logits_a).all()
    # equal up to float rounding, which depends on the batch composition
    np.testing.assert_allclose(pool3_a, pool3_b[::-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits_a, logits_b[::-1], rtol=1e-4, atol=1e-4)
    # 'tiny' is the same seeded file, built into the cache and loaded the same way
    tiny = resolve_inception("tiny", tmp_path / "cache")
    assert torch.load(tiny, weights_only=True).keys() == torch.load(weights, weights_only=True).keys()


def test_real_inception_weights_format_loads_through_the_same_path(tmp_path):
    """A torch-fidelity-format state dict (random values, no download) loads strictly into the real net."""
    weights = tmp_path / "random-fid-inception.pth"
    torch.save(_fidelity_layout().state_dict(), weights)
    model = load_inception(weights)
    assert type(model).__name__ == "RealInception"
    pool3, logits = extract_features(model, _images(1, size=80), batch_size=1)
    assert pool3.shape == (1, POOL3_DIM) and logits.shape == (1, IS_CLASSES)
    assert np.isfinite(pool3).all() and (pool3 >= 0).all()


def _fidelity_layout() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 module tree (same names and shapes), randomly initialised."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    net = torch.nn.Module()
    layers = {
        "Conv2d_1a_3x3": fe.BasicConv2d(3, 32, kernel_size=3, stride=2),
        "Conv2d_2a_3x3": fe.BasicConv2d(32, 32, kernel_size=3),
        "Conv2d_2b_3x3": fe.BasicConv2d(32, 64, kernel_size=3, padding=1),
        "Conv2d_3b_1x1": fe.BasicConv2d(64, 80, kernel_size=1),
        "Conv2d_4a_3x3": fe.BasicConv2d(80, 192, kernel_size=3),
        "Mixed_5b": fe.InceptionA(192, pool_features=32), "Mixed_5c": fe.InceptionA(256, pool_features=64),
        "Mixed_5d": fe.InceptionA(288, pool_features=64), "Mixed_6a": fe.InceptionB(288),
        "Mixed_6b": fe.InceptionC(768, channels_7x7=128), "Mixed_6c": fe.InceptionC(768, channels_7x7=160),
        "Mixed_6d": fe.InceptionC(768, channels_7x7=160), "Mixed_6e": fe.InceptionC(768, channels_7x7=192),
        "Mixed_7a": fe.InceptionD(768), "Mixed_7b": fe.InceptionE_1(1280), "Mixed_7c": fe.InceptionE_2(2048),
        "fc": torch.nn.Linear(2048, 1008),
    }
    for name, layer in layers.items():
        net.add_module(name, layer)
    return net


def test_missing_weights_name_the_config_key(tmp_path, s3_bucket, s3_server):
    with pytest.raises(UserError, match=r"evaluate\.inception_weights: .*nope\.pt not found; run `t2id models cache`"):
        resolve_inception(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(UserError, match=r"evaluate\.inception_weights: s3://.* not found"):
        resolve_inception(f"s3://{s3_bucket}/missing.pt", tmp_path, endpoint_url=s3_server)
    with pytest.raises(UserError, match=r"evaluate\.clip_weights: .* not found"):
        check_clip_source(str(tmp_path / "no-clip"))
    with pytest.raises(UserError, match=r"evaluate\.clip_weights: .* not found"):
        ClipScorer(f"s3://{s3_bucket}/no-clip", tmp_path, endpoint_url=s3_server)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


def test_clip_vocab_is_the_real_clip_bpe(tiny_clip_dir):
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    # ids of openai/clip-* (checked against open_clip's SimpleTokenizer on the same BPE file)
    assert tokenizer("High-resolution ultrasound scan")["input_ids"] == [49406, 1400, 268, 9977, 29717, 11261, 49407]


def test_clip_scorer_tiny_via_s3_is_deterministic_in_range_and_matches_clip_forward(tmp_path, s3_bucket, s3_server,
                                                                                    tiny_clip_dir):
    folder = tiny_clip_dir
    uri = upload_path(folder, f"s3://{s3_bucket}/models/clip", endpoint_url=s3_server)
    scorer = ClipScorer(uri, tmp_path / "cache", endpoint_url=s3_server)
    images = _images(4, size=64) + _images(2, size=48, seed=3, bright=80)
    prompts = [PROMPT, "High-resolution ultrasound scan of the human tracheal ring", "a cat", "", PROMPT, "x " * 300]
    scores = scorer(images, prompts)
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 100)).all()
    np.testing.assert_array_equal(scores, ClipScorer(str(folder), tmp_path / "cache")(images, prompts))
    # The clamp hides the sign, so check the raw cosines against CLIP's own forward pass, whose
    # logits_per_image = exp(logit_scale) * cos(image, text). (torchmetrics' CLIPScore would be the
    # natural reference, but torchmetrics 1.9 cannot read transformers 5's get_*_features output.)
    img_emb, txt_emb = scorer.embed(images, prompts)
    ours = 100 * np.sum(img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
                        * txt_emb / np.linalg.norm(txt_emb, axis=1, keepdims=True), axis=1)
    inputs = scorer.processor(text=prompts, images=[im.convert("RGB") for im in images], return_tensors="pt",
                              padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = scorer.model(**inputs)
    reference = 100 * torch.diagonal(out.logits_per_image).numpy() / scorer.model.logit_scale.exp().item()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores, np.maximum(ours, 0), rtol=1e-6, atol=1e-6)
