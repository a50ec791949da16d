"""Pure metrics: reconstruction (FVU, L0, dead fraction), CoSy and the Monosemanticity Score."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from nacosae.metrics import (
    RunningSAEMetrics,
    cosy_scores,
    cosy_scores_batched,
    dead_fraction,
    evaluate_sae,
    explained_variance,
    fvu,
    l0,
    monosemanticity_score,
    monosemanticity_score_pairwise,
)
from nacosae.sae import SAE, SAEConfig


# ------------------------------------------------------------------------------------------------ reconstruction
def test_fvu_limits_and_hand_value():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): total variance 1+1+1+1 = 4
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared error 1
    assert fvu(x, x_hat) == pytest.approx(0.25)
    assert explained_variance(x, x_hat) == pytest.approx(0.75)


def test_fvu_rejects_zero_variance_and_shape_mismatch():
    x = torch.ones(4, 3)
    with pytest.raises(ValueError, match="zero variance"):
        fvu(x, x)
    with pytest.raises(ValueError, match="same shape"):
        fvu(torch.randn(4, 3), torch.randn(4, 2))


def test_l0_and_dead_fraction():
    codes = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 3.0, 1.0, 0.0]])
    assert l0(codes) == pytest.approx(5 / 3)
    assert l0(codes.reshape(1, 3, 4)) == pytest.approx(5 / 3)  # leading dims are rows
    counts = (codes > 0).sum(0)
    assert dead_fraction(counts, 3) == 0.5
    assert dead_fraction(counts, 3, min_frequency=0.7) == 0.75  # latent 1 fires on 2/3 ≤ 0.7, latent 2 on 3/3
    with pytest.raises(ValueError, match="0..n_rows"):
        dead_fraction(counts, 1)


def test_running_metrics_match_one_shot_computation_with_a_large_mean():
    # A large common offset makes Σx² − (Σx)²/n lose digits in float32; the streamed Chan merge must not.
    gen = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(1000, 16, generator=gen, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn(1000, 16, generator=gen, dtype=torch.float64)
    codes = torch.relu(torch.randn(1000, 32, generator=gen) - 1.5)
    codes[:, :5] = 0  # 5 dead latents
    m = RunningSAEMetrics()
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:  # uneven batches, one of a single row
        m.update(x[lo:hi].float(), x_hat[lo:hi].float(), codes[lo:hi])
    out = m.compute()
    x64, xh64 = x.float().double(), x_hat.float().double()
    expected_fvu = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert out["fvu"] == pytest.approx(expected_fvu.item(), rel=1e-9)
    assert out["explained_variance"] == pytest.approx(1 - expected_fvu.item(), rel=1e-9)
    assert out["l0"] == pytest.approx((codes > 0).sum(1).double().mean().item())
    assert out["dead_fraction"] == pytest.approx(5 / 32)
    assert out["n_rows"] == 1000


def test_evaluate_sae_equals_direct_computation_on_token_blocks():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=3))
    acts = torch.randn(10, 4, 8) * 3 + 1
    sae.init_from_data(acts.reshape(-1, 8))
    blocks = [(torch.arange(0, 6), acts[:6]), (torch.arange(6, 10), acts[6:])]  # the store's (image_idx, acts) blocks
    out = evaluate_sae(sae, blocks)
    x = acts.reshape(-1, 8)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    assert out["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-6)
    assert out["l0"] == pytest.approx(3.0)
    assert out["dead_fraction"] == pytest.approx(((codes > 0).sum(0) == 0).double().mean().item())
    assert out["n_rows"] == 40


# ------------------------------------------------------------------------------------------------ CoSy
def test_cosy_hand_computed():
    # pairs (syn, ctrl): 1>0, 1<2, 2>0, 2=2, 3>0, 3>2 → (4 + ½) / 6
    auc, mad = cosy_scores([1.0, 2.0, 3.0], [0.0, 2.0])
    assert auc == pytest.approx(0.75)
    assert mad == pytest.approx((2.0 - 1.0) / math.sqrt(2.0))  # unbiased std of (0, 2) is √2


def test_cosy_mad_is_zero_for_constant_controls_and_auc_extremes():
    auc, mad = cosy_scores([5.0, 6.0], [0.0, 0.0, 0.0])
    assert auc == 1.0 and mad == 0.0
    auc, _ = cosy_scores([0.0, 0.0], [1.0, 2.0])
    assert auc == 0.0
    auc, _ = cosy_scores([1.0, 1.0], [1.0, 1.0])  # all tied
    assert auc == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosy_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    N, M, F = 37, 53, 20
    # Rounded and ReLU-clipped values: many ties, including at 0 (silent features) as real codes have.
    syn = np.maximum(np.round(rng.normal(0.5, 1.0, (N, F)), 1), 0)
    ctrl = np.maximum(np.round(rng.normal(0.0, 1.0, (M, F)), 1), 0)
    syn[:, 0] = 0.0
    ctrl[:, 0] = 0.0  # a dead feature: every pair tied
    auc_F, mad_F = cosy_scores_batched(syn, ctrl)
    labels = np.r_[np.ones(N), np.zeros(M)]
    for f in range(F):
        expected = roc_auc_score(labels, np.r_[syn[:, f], ctrl[:, f]])
        assert auc_F[f].item() == pytest.approx(expected, abs=1e-12)
        std = ctrl[:, f].std(ddof=1)
        expected_mad = 0.0 if std == 0 else (syn[:, f].mean() - ctrl[:, f].mean()) / std
        assert mad_F[f].item() == pytest.approx(expected_mad, abs=1e-12)
    single_auc, single_mad = cosy_scores(syn[:, 3], ctrl[:, 3])
    assert single_auc == pytest.approx(auc_F[3].item()) and single_mad == pytest.approx(mad_F[3].item())


def test_cosy_rejects_bad_input():
    with pytest.raises(ValueError, match="2 control"):
        cosy_scores([1.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        cosy_scores([float("nan")], [0.0, 1.0])
    with pytest.raises(ValueError, match="same F"):
        cosy_scores_batched(np.zeros((3, 2)), np.zeros((3, 3)))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_metric_refuses_non_finite_activations(bad):
    """One check for all: an inf would make CoSy's MAD 0 or inf, FVU inf and MS NaN without a word."""
    x = torch.randn(8, 4)
    x_bad = x.clone()
    x_bad[2, 1] = bad
    calls = {
        "cosy (generated)": lambda: cosy_scores([1.0, bad], [0.0, 1.0, 2.0]),
        "cosy (control)": lambda: cosy_scores([1.0, 2.0], [0.0, bad, 2.0]),
        "cosy batched": lambda: cosy_scores_batched(x_bad[:3], x[3:]),
        "fvu (x)": lambda: fvu(x_bad, x),
        "fvu (x_hat)": lambda: fvu(x, x_bad),
        "l0": lambda: l0(x_bad),
        "running": lambda: RunningSAEMetrics().update(x, x, codes_BS=x_bad),
        "ms (acts)": lambda: monosemanticity_score(x_bad, torch.randn(8, 3)),
        "ms (embeddings)": lambda: monosemanticity_score(x, torch.randn(8, 3).index_put_((torch.tensor(0), torch.tensor(0)),
                                                                                         torch.tensor(bad))),
        "ms pairwise": lambda: monosemanticity_score_pairwise(x_bad, torch.randn(8, 3)),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match="non-finite") as e:
            call()
        assert ("(1 NaN, 0 ±inf)" if math.isnan(bad) else "(0 NaN, 1 ±inf)") in str(e.value), what


# ------------------------------------------------------------------------------------------------ Monosemanticity Score
def test_ms_hand_computed():
    emb = torch.tensor([[0.3, -0.2], [1.0, 0.0], [0.0, 2.0], [0.6, 0.8]], dtype=torch.float64)  # rows 1..3 unit after normalising
    acts = torch.tensor(
        [
            [0.0, 5.0, 0.0, 0.0],
            [1.0, 5.0, 0.0, 0.0],
            [2.0, 5.0, 1.0, 0.0],
            [2.0, 5.0, 0.0, 0.0],
        ]
    )
    # feature 0: ã = (0, ½, 1, 1); pairs (1,2) w ½ cos 0, (1,3) w ½ cos .6, (2,3) w 1 cos .8 → 1.1 / 2
    # feature 1: constant → NaN; feature 2: a single nonzero ã → no pair weight → NaN; feature 3: dead → NaN
    for ms in (monosemanticity_score(acts, emb), monosemanticity_score_pairwise(acts, emb)):
        assert ms.dtype == torch.float64 and ms.shape == (4,)
        assert ms[0].item() == pytest.approx(0.55, abs=1e-12)
        assert torch.isnan(ms[1:]).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ms_closed_form_equals_pairwise(seed):
    gen = torch.Generator().manual_seed(seed)
    N, S, E = 60, 12, 5
    acts = torch.relu(torch.randn(N, S, generator=gen) - 0.5)
    acts[:, 0] = 0.0  # dead
    acts[:, 1] = 3.0  # constant
    emb = torch.randn(N, E, generator=gen) + 0.5  # a shared offset: positive mean cosine
    closed = monosemanticity_score(acts, emb, chunk_size=5)  # chunks that do not divide S
    pairwise = monosemanticity_score_pairwise(acts, emb)
    assert torch.isnan(closed[:2]).all() and torch.isnan(pairwise[:2]).all()
    torch.testing.assert_close(closed, pairwise, rtol=1e-10, atol=1e-12, equal_nan=True)
    closed32 = monosemanticity_score(acts, emb, dtype=torch.float32)
    torch.testing.assert_close(closed32, pairwise, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_ms_is_one_for_identical_embeddings_and_rejects_zero_embeddings():
    acts = torch.rand(10, 3)
    same = torch.ones(10, 4)
    assert torch.allclose(monosemanticity_score(acts, same), torch.ones(3, dtype=torch.float64))
    bad = torch.randn(10, 4)
    bad[2] = 0
    with pytest.raises(ValueError, match="all zeros"):
        monosemanticity_score(acts, bad)
    with pytest.raises(ValueError, match="N=10"):
        monosemanticity_score(acts, torch.randn(9, 4))


def test_label_purity_and_random_floor():
    from nacosae.metrics import label_purity, random_set_purity

    labels = ["cat", "cat", "dog", None, "cat", "dog"]
    top = torch.tensor([[0, 1, 4, -1], [2, 5, 0, 3], [-1, -1, -1, -1], [3, -1, -1, -1]])
    p = label_purity(top, labels)
    assert p[0] == 1.0 and p[1] == pytest.approx(2 / 3)
    assert np.isnan(p[2]) and np.isnan(p[3])
    # two balanced labels: a random pair is pure half the time → mean purity 0.5·1 + 0.5·0.5 = 0.75 (approx., no replacement)
    floor = random_set_purity(["a", "b"] * 500, set_size=2, n_sets=4000, seed=0)
    assert 0.70 < floor < 0.80
