"""Streaming feature statistics against a brute-force, all-in-memory computation (METHODS §2)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nacosae.features import (
    STATS_ARRAYS,
    STATS_META,
    FeatureStats,
    FeatureStatsAccumulator,
    FeatureStatsConfig,
    FeatureStatsError,
    aggregate_tokens,
    backbone_blocks,
    compute_feature_stats,
    heatmap_overlay,
)
from nacosae.sae import SAE, SAEConfig

T, D, S = 6, 8, 24


def brute_force(image_idx_N: np.ndarray, codes_NTS: np.ndarray, cfg: FeatureStatsConfig) -> dict:
    """Everything from all codes at once, with numpy: the definition the streaming pass must reproduce."""
    if cfg.aggregation == "max":
        acts_NS = codes_NTS.max(1)
    elif cfg.aggregation == "mean":
        acts_NS = codes_NTS.sum(1, dtype=np.float32) / np.float32(codes_NTS.shape[1])
    else:
        acts_NS = codes_NTS[:, cfg.cls_token]
    N, K = len(image_idx_N), cfg.top_n
    out = {
        "image_fire": (acts_NS > 0).sum(0),
        "token_fire": (codes_NTS > 0).sum((0, 1)),
        "mean_act": acts_NS.astype(np.float64).mean(0),
        "max_act": acts_NS.max(0),
        "mean_token_act": codes_NTS.astype(np.float64).mean((0, 1)),
        "top_idx": np.full((S, K), -1),
        "top_val": np.full((S, K), np.nan, dtype=np.float32),
        "top_maps": np.zeros((S, K, codes_NTS.shape[1]), dtype=np.float32),
        "hist": np.zeros((S, cfg.n_bins), dtype=np.int64),
        "hist_top": np.zeros(S),
    }
    for j in range(S):
        order = np.lexsort((image_idx_N, -acts_NS[:, j]))[: min(K, N)]  # activation desc, then image index asc
        out["top_idx"][j, : len(order)] = image_idx_N[order]
        out["top_val"][j, : len(order)] = acts_NS[order, j]
        out["top_maps"][j, : len(order)] = codes_NTS[order, :, j]
        pos = acts_NS[:, j][acts_NS[:, j] > 0].astype(np.float64)
        if len(pos):
            top = 2.0 ** np.frexp(pos.max())[1]  # smallest power of two strictly above the max
            out["hist"][j] = np.histogram(pos, bins=np.linspace(0, top, cfg.n_bins + 1))[0]
            out["hist_top"][j] = top
    return out


def assert_matches(stats: FeatureStats, ref: dict, exact_sums: bool = False):
    np.testing.assert_array_equal(stats.image_fire_count_S.numpy(), ref["image_fire"])
    np.testing.assert_array_equal(stats.token_fire_count_S.numpy(), ref["token_fire"])
    np.testing.assert_array_equal(stats.top_images_SK.numpy(), ref["top_idx"])
    np.testing.assert_array_equal(stats.top_values_SK.numpy(), ref["top_val"])
    np.testing.assert_array_equal(stats.top_maps_SKT.numpy(), ref["top_maps"])
    np.testing.assert_array_equal(stats.act_max_S.numpy(), ref["max_act"])
    np.testing.assert_array_equal(stats.hist_counts_SH.numpy(), ref["hist"])
    for j in range(S):
        assert stats.hist_edges(j)[-1].item() == ref["hist_top"][j]
    rtol = 1e-12 if exact_sums else 1e-6
    np.testing.assert_allclose(stats.mean_act_S.numpy(), ref["mean_act"], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(stats.mean_token_act_S.numpy(), ref["mean_token_act"], rtol=rtol, atol=1e-12)


def tied_codes(n_images: int, seed: int) -> np.ndarray:
    """Sparse codes on a coarse grid (many exact ties, like ReLU6 saturating at 6.0), spanning several octaves."""
    rng = np.random.default_rng(seed)
    codes = np.maximum(rng.normal(0, 1, (n_images, T, S)), 0)
    codes = np.round(codes * 2) / 2 * (2.0 ** rng.integers(-3, 4, S))  # per-feature scales: histogram ranges differ
    codes[:, :, 0] = 0.0  # dead
    codes[:, :, 1] = 6.0  # saturated everywhere: every image ties
    codes[: n_images // 2, :, 2] = 0.0  # late riser: its histogram range grows after the first blocks
    codes[n_images // 2 :, :, 2] *= 1000
    return codes.astype(np.float32)


@pytest.mark.parametrize("aggregation", ["max", "mean", "cls"])
@pytest.mark.parametrize("seed", [0, 1])
def test_accumulator_matches_brute_force_with_ties(aggregation, seed):
    cfg = FeatureStatsConfig(top_n=7, aggregation=aggregation, n_bins=16, cls_token=2)
    codes = tied_codes(90, seed)
    image_idx = np.sort(np.random.default_rng(seed).choice(10_000, 90, replace=False))
    acc = FeatureStatsAccumulator(S, T, cfg)
    for lo, hi in [(0, 1), (1, 20), (20, 21), (21, 64), (64, 90)]:  # uneven blocks, smaller and larger than top_n
        acc.update(torch.from_numpy(image_idx[lo:hi]), torch.from_numpy(codes[lo:hi]))
    stats = acc.result()
    assert stats.aggregation == aggregation and stats.n_images == 90
    assert_matches(stats, brute_force(image_idx, codes, cfg))
    assert stats.dead_S[0] and not stats.dead_S[1]
    assert stats.dense_S[1] and not stats.dense_S[0]
    assert stats.top_images_SK[1].tolist() == image_idx[:7].tolist()  # all tied at 6.0: the smallest indices win
    assert np.isnan(stats.mean_act_firing_S[0].item())


def test_negative_codes_are_ranked_and_not_counted_as_firing():
    # SAE codes end in a ReLU, but the accumulator must stay exact for any real codes (e.g. a raw-neuron baseline).
    cfg = FeatureStatsConfig(top_n=4, n_bins=8)
    codes = tied_codes(40, 4) - np.float32(0.75)
    acc = FeatureStatsAccumulator(S, T, cfg)
    for lo in range(0, 40, 9):
        acc.update(torch.arange(lo, min(lo + 9, 40)), torch.from_numpy(codes[lo : lo + 9]))
    assert_matches(acc.result(), brute_force(np.arange(40), codes, cfg))


def test_block_order_does_not_change_the_result():
    cfg = FeatureStatsConfig(top_n=5, n_bins=8)
    codes, image_idx = tied_codes(60, 3), np.arange(60)
    ref = brute_force(image_idx, codes, cfg)
    perm = np.random.default_rng(0).permutation(60)  # images in random order, in blocks of 7
    acc = FeatureStatsAccumulator(S, T, cfg)
    for lo in range(0, 60, 7):
        sel = perm[lo : lo + 7]
        acc.update(torch.from_numpy(image_idx[sel]), torch.from_numpy(codes[sel]))
    assert_matches(acc.result(), ref)


def test_fewer_images_than_top_n_leaves_marked_empty_slots():
    cfg = FeatureStatsConfig(top_n=10)
    codes = tied_codes(4, 5)
    acc = FeatureStatsAccumulator(S, T, cfg)
    acc.update(torch.tensor([3, 1, 7, 2]), torch.from_numpy(codes))
    stats = acc.result()
    assert (stats.top_images_SK[:, 4:] == -1).all() and stats.top_values_SK[:, 4:].isnan().all()
    assert (stats.top_images_SK[:, :4] >= 0).all()
    assert stats.top_images(0) == []  # dead: no firing image to show
    assert len(stats.top_images(0, firing_only=False)) == 4


def make_sae(seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D, d_sae=S, k=4))
    sae.init_from_data(torch.randn(256, D) * 2 + 1)
    return sae.eval()


def store_like_blocks(acts_NTD: torch.Tensor, batch: int, crash_after: int | None = None):
    """What ActivationStore.iter_images yields: (image_idx_N, acts_NTD) in image order; optionally dies mid-way."""
    for b, lo in enumerate(range(0, len(acts_NTD), batch)):
        if crash_after is not None and b == crash_after:
            raise KeyboardInterrupt("killed")
        yield torch.arange(lo, min(lo + batch, len(acts_NTD))), acts_NTD[lo : lo + batch]


def reference_codes(sae: SAE, acts_NTD: torch.Tensor, batch: int) -> np.ndarray:
    # Encode block by block like the pass does, so float results are bit-identical.
    with torch.no_grad():
        return torch.cat([sae.encode(acts_NTD[lo : lo + batch]) for lo in range(0, len(acts_NTD), batch)]).numpy()


def test_compute_feature_stats_with_a_real_sae_and_duplicate_images(tmp_path):
    sae = make_sae()
    acts = torch.randn(50, T, D) * 2 + 1
    acts[10:20] = acts[5]  # identical images: identical codes, ties broken by index
    cfg = FeatureStatsConfig(top_n=6, n_bins=32)
    stats = compute_feature_stats(sae, store_like_blocks(acts, 8), cfg, progress=False, provenance={"sae": "test"})
    assert_matches(stats, brute_force(np.arange(50), reference_codes(sae, acts, 8), cfg))
    stats.save(tmp_path / "stats")
    loaded = FeatureStats.load(tmp_path / "stats")
    for f in dataclasses.fields(FeatureStats):
        a, b = getattr(stats, f.name), getattr(loaded, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a.nan_to_num(-7), b.nan_to_num(-7)), f.name
        else:
            assert a == b, f.name
    assert json.loads((tmp_path / "stats" / STATS_META).read_text())["config"]["aggregation"] == "max"


def test_killed_pass_resumes_to_the_same_result(tmp_path):
    sae = make_sae(1)
    acts = torch.randn(70, T, D) * 2 + 1
    cfg = FeatureStatsConfig(top_n=5, n_bins=16)
    full = compute_feature_stats(sae, store_like_blocks(acts, 6), cfg, progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        compute_feature_stats(sae, store_like_blocks(acts, 6, crash_after=7), cfg, out_dir=out, checkpoint_every=3, progress=False)
    partial = FeatureStats.load(out / "checkpoint")
    assert partial.n_images == 36 and partial.last_image_idx == 35  # checkpoint after 6 blocks of 6
    with pytest.raises(FeatureStatsError, match="same settings"):
        compute_feature_stats(sae, store_like_blocks(acts, 6), dataclasses.replace(cfg, top_n=4), out_dir=out, progress=False)
    resumed = compute_feature_stats(sae, store_like_blocks(acts, 6), cfg, out_dir=out, checkpoint_every=3, progress=False)
    assert not (out / "checkpoint").exists()
    final = FeatureStats.load(out)
    assert_matches(final, brute_force(np.arange(70), reference_codes(sae, acts, 6), cfg), exact_sums=False)
    for name in ("image_fire_count_S", "token_fire_count_S", "act_max_S", "hist_counts_SH", "top_images_SK", "top_maps_SKT"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    torch.testing.assert_close(resumed.act_sum_S, full.act_sum_S, rtol=1e-12, atol=0)


def test_resumable_pass_rejects_unordered_blocks(tmp_path):
    sae = make_sae()
    acts = torch.randn(10, T, D)
    blocks = [(torch.tensor([5, 6]), acts[:2]), (torch.tensor([1, 2]), acts[2:4])]
    with pytest.raises(ValueError, match="increasing image order"):
        compute_feature_stats(sae, blocks, out_dir=tmp_path, progress=False)


def test_interrupted_save_is_detected(tmp_path):
    acc = FeatureStatsAccumulator(S, T, FeatureStatsConfig(top_n=3))
    acc.update(torch.arange(4), torch.from_numpy(tied_codes(4, 0)))
    acc.result().save(tmp_path / "a")
    acc.update(torch.arange(4, 8), torch.from_numpy(tied_codes(4, 1)))
    acc.result().save(tmp_path / "b")
    (tmp_path / "b" / STATS_ARRAYS).replace(tmp_path / "a" / STATS_ARRAYS)  # new arrays, old metadata
    with pytest.raises(FeatureStatsError, match="different writes"):
        FeatureStats.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="feature_stats.py"):
        FeatureStats.load(tmp_path / "missing")


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="power of two"):
        FeatureStatsConfig(n_bins=10)
    with pytest.raises(ValueError, match="aggregation"):
        FeatureStatsConfig(aggregation="median")
    with pytest.raises(ValueError, match="cls_token"):
        FeatureStatsAccumulator(S, 1, FeatureStatsConfig(aggregation="cls", cls_token=1))
    acc = FeatureStatsAccumulator(S, T)
    with pytest.raises(ValueError, match="T=3"):
        acc.update(torch.arange(2), torch.zeros(2, 3, S))
    bad = torch.zeros(2, T, S)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.arange(2), bad)
    with pytest.raises(ValueError, match="no images"):
        acc.result()


class TinyConvBackbone:
    """A real (random-weight) CNN behind the backbone interface: a 4×4 map of D channels = 16 spatial tokens."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, D, 4, stride=4), torch.nn.ReLU())

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)

    def activations(self, pixels_BCHW, layer, tokens="all"):
        return self.net(pixels_BCHW).flatten(2).transpose(1, 2)  # (B, 16, D)


def test_backbone_blocks_feed_the_same_pass():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(11)]
    bb = TinyConvBackbone()
    blocks = list(backbone_blocks(bb, images, layer="conv", batch_images=4))
    assert [b[0].tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert blocks[0][1].shape == (4, 16, D)
    sae = make_sae()
    stats = compute_feature_stats(sae, iter(blocks), FeatureStatsConfig(top_n=3), progress=False)
    assert stats.n_images == 11 and stats.tokens_per_image == 16


def test_aggregate_tokens_by_hand_and_its_errors():
    codes_NTS = torch.tensor([[[1.0, 0.0], [3.0, -1.0], [2.0, 4.0]]])  # 1 image, 3 tokens, 2 features
    assert aggregate_tokens(codes_NTS, "max").tolist() == [[3.0, 4.0]]
    assert aggregate_tokens(codes_NTS, "mean").tolist() == [[2.0, 1.0]]
    assert aggregate_tokens(codes_NTS, "cls", cls_token=1).tolist() == [[3.0, -1.0]]
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_tokens(codes_NTS, "median")
    with pytest.raises(ValueError, match="cls_token=3 but images have 3 tokens"):
        aggregate_tokens(codes_NTS, "cls", cls_token=3)
    with pytest.raises(ValueError, match=r"\(N images, T ≥ 1 tokens, S\)"):
        aggregate_tokens(codes_NTS[0], "max")
    with pytest.raises(ValueError, match="T ≥ 1"):
        aggregate_tokens(torch.zeros(2, 0, 5), "mean")


@pytest.mark.parametrize("aggregation", ["max", "mean", "cls"])
def test_stats_and_scorer_agree_on_image_level_activations(aggregation):
    """The feature statistics and the MILS scorer (like evaluation and the app) go through `aggregate_tokens`: a probe
    image scored again gets exactly the activation the statistics recorded for it."""
    from nacosae.naming.scorer import FeatureScorer

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(9)]
    bb, sae = TinyConvBackbone(), make_sae()
    cfg = FeatureStatsConfig(top_n=2, aggregation=aggregation, cls_token=3)
    stats = compute_feature_stats(sae, backbone_blocks(bb, images, layer="conv", batch_images=4), cfg, progress=False)
    scorer = FeatureScorer.from_stats(bb, "conv", "all", sae, stats)
    acts_NS = scorer.activations(images, range(S))
    assert torch.allclose(acts_NS.amax(0), stats.act_max_S, atol=1e-6)
    best_N = stats.top_images_SK[:, 0]
    assert torch.allclose(acts_NS[best_N, torch.arange(S)], stats.top_values_SK[:, 0], atol=1e-6)
    with torch.no_grad():
        codes_NTS = sae.encode(bb.activations(torch.stack([bb.preprocess(im) for im in images]), "conv").reshape(-1, D))
    assert torch.allclose(aggregate_tokens(codes_NTS.reshape(9, 16, S), aggregation, 3), acts_NS, atol=1e-6)


def test_heatmap_overlay_marks_only_the_active_cells():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    token_map = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 2×3 grid, top-left cell active
    out = np.asarray(heatmap_overlay(image, token_map, (2, 3)))
    assert out.shape == (20, 40, 3)
    assert (out[:3, :3] != 255).any(axis=-1).all()  # top-left corner coloured
    assert (out[-5:, -10:] == 255).all()  # far from the active cell: untouched
    same = heatmap_overlay(image, torch.zeros(6), (2, 3))  # silent feature: the image itself
    assert np.array_equal(np.asarray(same), np.asarray(image))
    faint = np.asarray(heatmap_overlay(image, token_map, (2, 3), vmax=40.0))  # a common scale shows a weak map weakly
    assert np.abs(255 - faint[:3, :3].astype(int)).sum() < np.abs(255 - out[:3, :3].astype(int)).sum()
    with pytest.raises(ValueError, match="CLS"):
        heatmap_overlay(image, torch.zeros(7), (2, 3))


# ------------------------------------------------------------------------------------------------ the CLI on a real store
def write_store(path, n_images: int, per_shard: int, seed: int = 0):
    from nacosae.store import ActivationStore, StoreWriter, finalize_store

    run = {"provenance": {"backbone": "random"}, "dtype": "float32", "n_images_total": n_images, "source": "random", "world_size": 1}
    w = StoreWriter(path, run, 0, 0, n_images)
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, n_images, per_shard):
        ids = list(range(lo, min(lo + per_shard, n_images)))
        w.write_shard(torch.randn(len(ids) * T, D, generator=g) * 2 + 1, torch.tensor(ids).repeat_interleave(T),
                      torch.arange(T).repeat(len(ids)), [{"image_idx": i} for i in ids], ids[-1] + 1, [])
    w.mark_done()
    assert finalize_store(path)
    return ActivationStore(path)


def test_cli_on_a_store_matches_the_library(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "hub_scripts" / "feature_stats.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--aggregation" in help_text and "--store" in help_text
    store = write_store(tmp_path / "store", 30, per_shard=7)
    sae = make_sae()
    sae.save_pretrained(tmp_path / "sae")
    cmd = [sys.executable, str(script), "--store", str(tmp_path / "store"), "--sae", str(tmp_path / "sae"), "--out",
           str(tmp_path / "stats"), "--batch-images", "4", "--checkpoint-every", "2", "--top-n", "5", "--aggregation", "mean"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stats = FeatureStats.load(tmp_path / "stats")
    assert stats.aggregation == "mean" and stats.n_images == 30 and stats.provenance["source"] == "store"
    expected = compute_feature_stats(make_sae(), store.iter_images(4), FeatureStatsConfig(top_n=5, aggregation="mean"), progress=False)
    assert torch.equal(stats.top_images_SK, expected.top_images_SK)
    assert torch.equal(stats.hist_counts_SH, expected.hist_counts_SH)
    assert not (tmp_path / "stats" / "checkpoint").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)  # finished stats are not recomputed
    assert "already holds" in again.stdout
