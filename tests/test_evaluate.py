"""Evaluation on a planted setup: Open Clip Art as the retrieval bank (real MiniLM embeddings), and "features" whose
activations are planted per image category. The right name must beat a wrong one on held-out renders (CoSy), a
feature that fires on one kind of image must be more monosemantic than one that fires at random (MS), and nothing the
loop could see may reach the evaluation."""

import math
import warnings

import pytest
import torch
from PIL import Image

from nacosae.evaluate import (
    NamingRunConfig,
    ThumbnailBank,
    cosy_for_name,
    load_thumbnail,
    publish,
    select_features,
    split_bank,
)
from nacosae.metrics import monosemanticity_report
from nacosae.naming.generators import DescribedImageBank, RetrievalGenerator, TextEmbedder
from nacosae.naming.mils import MILSConfig, new_state, run_mils
from nacosae.naming.proposers import ScriptedProposer
from nacosae.naming.report import (
    comparison_table,
    method_table_markdown,
    plot_auc_distributions,
    plot_mils_scores,
    plot_ms,
)
from nacosae.naming.scorer import REF_KEY, ImageActivationTable, TableScorer
from nacosae.naming.vocab import OPENCLIPART_DIR

pytestmark = pytest.mark.skipif(not OPENCLIPART_DIR.is_dir(), reason="Debian openclipart-png not installed")
CATEGORIES = ("animals", "food", "transportation", "tools")


def _small(path, max_pixels=300_000) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:  # header only
                return im.width * im.height <= max_pixels
    except Image.DecompressionBombError:  # Open Clip Art has one 623-megapixel file
        return False


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    paths = []
    for c in CATEGORIES:  # 24 small images per category, spread over its folders
        files = [f for f in sorted((OPENCLIPART_DIR / c).rglob("*.png")) if _small(f)]
        paths += files[:: max(1, len(files) // 24)][:24]
    tmp = tmp_path_factory.mktemp("bank")
    base = DescribedImageBank.from_openclipart(OPENCLIPART_DIR, paths=paths, embedder=TextEmbedder(), cache_dir=tmp)
    return ThumbnailBank(base.paths, base.descriptions, base.labels, base.embeddings_NE, base.embedder,
                         thumb_dir=tmp / "thumbs")


@pytest.fixture(scope="module")
def table(bank):
    """Feature 0 fires on animals, feature 1 on food, feature 2 on a random half of the images (polysemantic)."""
    g = torch.Generator().manual_seed(0)
    labels = bank.labels
    acts = torch.zeros(len(bank), 3)
    acts[:, 0] = torch.tensor([1.0 if lab == "animals" else 0.0 for lab in labels]) * (1 + torch.rand(len(bank), generator=g))
    acts[:, 1] = torch.tensor([1.0 if lab == "food" else 0.0 for lab in labels]) * (1 + torch.rand(len(bank), generator=g))
    acts[:, 2] = (torch.rand(len(bank), generator=g) < 0.5).float() * (1 + torch.rand(len(bank), generator=g))
    return ImageActivationTable([str(p) for p in bank.paths], acts, acts.clone(), "max")


def test_split_is_by_image_disjoint_and_seeded(bank):
    search, held = split_bank(bank, 0.5, seed=0)
    s, e = set(map(str, search.paths)), set(map(str, held.paths))
    assert not s & e and s | e == set(map(str, bank.paths)) and len(e) == len(bank) // 2
    again = split_bank(bank, 0.5, seed=0)[1]
    other = split_bank(bank, 0.5, seed=1)[1]
    assert list(again.paths) == list(held.paths) and set(other.paths) != e
    # a subset keeps each image's description, label and embedding row together
    i = bank.paths.index(held.paths[3])
    assert held.descriptions[3] == bank.descriptions[i] and torch.equal(held.embeddings_NE[3], bank.embeddings_NE[i])
    assert search.id != held.id != bank.id
    with pytest.raises(ValueError, match="both halves"):
        split_bank(bank.subset([0, 1]), 0.1)


def test_right_name_beats_wrong_name_on_held_out_renders(bank, table):
    _search, held = split_bank(bank, 0.5, seed=0)
    cfg = MILSConfig(n_iterations=1, n_candidates=2, n_best=2, n_images=3)
    gen_eval = RetrievalGenerator(held)
    held_refs = set(map(str, held.paths))
    control = [r for r in table.refs if r not in held_refs]
    ctrl_M = table.rows(control)[:, 0]

    def cosy(name, j=0):
        return cosy_for_name(name, gen_eval, cfg.eval_seeds(8), lambda rs: table.rows([r.ref for r in rs])[:, j],
                             table.rows(control)[:, j])

    right, wrong = cosy("a dog"), cosy("a car")
    assert right["auc"] > 0.8 and right["mad"] > 1.0, right
    assert wrong["auc"] < 0.6 and wrong["mad"] < right["mad"], wrong
    assert cosy("bread", j=1)["auc"] > cosy("a dog", j=1)["auc"]
    # the renders come from the eval half only, and not at the ranks the loop uses
    assert set(right["render_refs"]) <= held_refs
    loop_refs = {r.ref for r in gen_eval.render("a dog", cfg.loop_seeds)}
    assert not loop_refs & set(right["render_refs"]) and len(right["render_refs"]) == 8
    assert math.isclose(right["auc"], float((table.rows(right["render_refs"])[:, 0][:, None] > ctrl_M[None]).double().mean()
                                            + 0.5 * (table.rows(right["render_refs"])[:, 0][:, None] == ctrl_M[None]).double().mean()))


def test_the_loop_never_sees_an_evaluation_image(bank, table):
    search, held = split_bank(bank, 0.5, seed=0)
    scorer = TableScorer(table, table.acts_NS.amax(0))
    cfg = MILSConfig(n_iterations=2, n_candidates=3, n_best=2, n_images=3)
    script = [["a cat", "a horse", "a bus"], ["a dog", "bread", "a hammer"]]
    state = run_mils(new_state(0, ["a lion", "a truck"]), ScriptedProposer(script), RetrievalGenerator(search), scorer, cfg,
                     progress=False)
    seen = {ref for c in state.candidates for ref in c.refs}
    evaluated = set()
    for c in state.candidates:
        evaluated |= set(cosy_for_name(c.prompt, RetrievalGenerator(held), cfg.eval_seeds(6),
                                       lambda rs: table.rows([r.ref for r in rs])[:, 0], table.rows(table.refs)[:, 0])["render_refs"])
    assert seen and evaluated and not seen & evaluated
    assert seen <= set(map(str, search.paths))
    # the loop's scores are the planted activations over the probe max, looked up by the ref the thumbnails carry
    cat = next(c for c in state.candidates if c.prompt == "a cat")
    want = [float(table.rows([r])[0, 0] / table.acts_NS[:, 0].max()) for r in cat.refs]
    assert cat.image_scores == pytest.approx(want)


def test_thumbnails_are_cached_and_carry_their_ref(bank, tmp_path):
    im = bank.load_image(0)
    assert im.size == (224, 224) and im.mode == "RGB" and im.info[REF_KEY] == str(bank.paths[0])
    first = load_thumbnail(bank.paths[0], tmp_path)
    assert len(list(tmp_path.rglob("*.png"))) == 1
    again = load_thumbnail(bank.paths[0], tmp_path)
    assert again.tobytes() == first.tobytes() == load_thumbnail(bank.paths[0]).tobytes()


def test_table_without_fallback_names_the_missing_image(table):
    with pytest.raises(KeyError, match="not in the activation table"):
        table.rows(["/nowhere.png"])
    with pytest.raises(KeyError, match="only for probe images"):
        table.raw_rows(["/nowhere.png"])


def test_planted_monosemantic_feature_beats_polysemantic_one(bank, table):
    """MS with embeddings that cluster by category: the one-category features score near 1, the random one near the
    equal-weights level, and so do 'raw channels' that mix categories."""
    g = torch.Generator().manual_seed(1)
    centre = {c: torch.randn(16, generator=g) * 3 for c in CATEGORIES}
    emb_NE = torch.stack([centre[lab] + torch.randn(16, generator=g) for lab in bank.labels])
    mixed = (table.acts_NS[:, :2].sum(1, keepdim=True) + table.acts_NS[:, 2:])  # a channel firing on two kinds of image
    rep = monosemanticity_report(table.acts_NS, mixed, emb_NE, named=[0, 1])
    ms = rep["ms_S"]
    assert ms[0] > 0.8 and ms[1] > 0.8 and ms[2] < ms[0] - 0.3
    assert abs(ms[2] - rep["uniform_weights_ms"]) < 0.15
    assert rep["summary_sae_named"]["mean"] > rep["summary_raw"]["mean"]
    dead = monosemanticity_report(torch.zeros(len(bank), 2), mixed, emb_NE)
    assert dead["ms_S"] == [None, None] and dead["summary_sae_alive"]["n_nan"] == 2


def test_publish_only_above_the_threshold():
    names = {"mils": "striped cat", "top_label": "animals", "random": "kettle", "mils_gemma": None}
    assert publish({"mils": 0.7, "top_label": 0.65, "random": 0.9}, names, 0.6) == ("striped cat", "mils")
    assert publish({"mils": 0.55, "top_label": 0.65, "random": 0.9}, names, 0.6) == ("animals", "top_label")
    assert publish({"mils": 0.55, "top_label": 0.58, "random": 0.99}, names, 0.6) == ("unnamed", None)  # random never
    assert publish({"mils": 0.7, "top_label": 0.7}, names, 0.6) == ("striped cat", "mils")  # ties: method order
    assert publish({"mils": float("nan"), "top_label": 0.61}, names, 0.6) == ("animals", "top_label")


def test_comparison_table_statistics_and_win_shares():
    rows = [{"cosy_auc_a": 0.9, "cosy_mad_a": 2.0, "cosy_auc_b": 0.5, "cosy_mad_b": 0.0},
            {"cosy_auc_a": 0.6, "cosy_mad_a": 1.0, "cosy_auc_b": 0.6, "cosy_mad_b": 1.0},
            {"cosy_auc_a": 0.3, "cosy_mad_a": -1.0, "cosy_auc_b": 0.7, "cosy_mad_b": 1.0},
            {"cosy_auc_a": 0.8, "cosy_mad_a": 1.0, "cosy_auc_b": None, "cosy_mad_b": None}]  # not in the comparison
    a, b = comparison_table(rows, ["a", "b"], threshold=0.6)
    assert a["n"] == b["n"] == 3
    assert a["auc_mean"] == pytest.approx(0.6) and a["auc_std"] == pytest.approx(0.3)
    assert b["mad_mean"] == pytest.approx(2 / 3)
    assert a["win_share"] == pytest.approx(0.5) and b["win_share"] == pytest.approx(0.5)  # a, tie, b
    assert a["share_auc_ge_threshold"] == pytest.approx(2 / 3) and b["share_auc_ge_threshold"] == pytest.approx(2 / 3)
    md = method_table_markdown([a, b], 0.6)
    assert "| a | 3 | 0.600 ± 0.300 |" in md and "AUC ≥ 0.6" in md
    assert comparison_table(rows[3:], ["a", "b"], 0.6) == []


def test_select_features_is_seeded_and_skips_dead_and_dense():
    class Stats:  # the three FeatureStats fields select_features reads
        dead_S = torch.tensor([True, False, False, False, False, False])
        dense_S = torch.tensor([False, True, False, False, False, False])
        image_fire_count_S = torch.tensor([0, 90, 20, 30, 5, 40])

    picked = select_features(Stats, 3, seed=0, min_fires=16)
    assert sorted(picked) == [2, 3, 5] and picked == select_features(Stats, 3, seed=0, min_fires=16)
    assert set(select_features(Stats, 2, seed=1, min_fires=16)) <= {2, 3, 5}
    with pytest.raises(ValueError, match="only 3 features"):
        select_features(Stats, 4, seed=0, min_fires=16)


def test_config_checks():
    with pytest.raises(ValueError, match="threshold"):
        NamingRunConfig(sae="s", stats="t", store="u", threshold=1.5)
    with pytest.raises(ValueError, match="n_control"):
        NamingRunConfig(sae="s", stats="t", store="u", n_control=1)
    with pytest.raises(ValueError, match="bank_source"):
        NamingRunConfig(sae="s", stats="t", store="u", bank_source="web")
    cfg = NamingRunConfig(sae="s", stats="t", store="u", n_images=3, n_eval_renders=5)
    assert cfg.eval_seeds == (3, 4, 5, 6, 7) and not set(cfg.eval_seeds) & set(cfg.mils_config("mils").loop_seeds)
    assert cfg.mils_config("mils_gemma").n_iterations == cfg.gemma_iterations


def test_plots_are_written(tmp_path):
    rows = [{"cosy_auc_mils": 0.7, "cosy_auc_random": 0.5}, {"cosy_auc_mils": 0.6, "cosy_auc_random": None}]
    for p in (plot_auc_distributions(rows, ["mils", "random"], tmp_path / "a.png", 0.6),
              plot_mils_scores({"mils": [{"scores_by_iteration": [0.2, 0.5, 0.6]}, {"scores_by_iteration": [0.3, 0.3]}]},
                               tmp_path / "m.png"),
              plot_ms([0.2, None, 0.4], [0.1, 0.15], tmp_path / "ms.png", "enc")):
        with Image.open(p) as im:
            assert im.size[0] > 200


def test_paired_difference_with_bootstrap_interval():
    from nacosae.naming.report import paired_difference

    rows = [{"cosy_auc_a": 0.9, "cosy_auc_b": 0.5}, {"cosy_auc_a": 0.7, "cosy_auc_b": 0.6},
            {"cosy_auc_a": 0.4, "cosy_auc_b": 0.6}, {"cosy_auc_a": 0.8, "cosy_auc_b": None}]
    p = paired_difference(rows, "a", "b", n_boot=2000, seed=0)
    assert p["n"] == 3 and p["mean"] == pytest.approx((0.4 + 0.1 - 0.2) / 3)
    assert -0.2 - 1e-9 <= p["ci95"][0] < p["mean"] < p["ci95"][1] <= 0.4 + 1e-9
    assert p["share_a_better"] == pytest.approx(2 / 3) and p["share_a_worse"] == pytest.approx(1 / 3)
    assert paired_difference(rows[3:], "a", "b") is None
