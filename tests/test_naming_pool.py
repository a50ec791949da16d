"""The shared render pool and the all-feature naming engine (issue 8): a prompt rendered once scores every feature,
the pool resumes after a kill, the three splits never mix, and a planted concept is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nacosae.naming.bank import SPLITS, Bank, family_splits
from nacosae.naming.engine import BankRetrieval, EngineConfig, NamingEngine, SplitScorer
from nacosae.naming.pool import PoolMismatchError, RenderPool
from nacosae.naming.run import bank_pool_rows

from conftest import CONCEPTS, planted_bank
from conftest import WordEmbedder as _WordEmbedder


def WordEmbedder():  # noqa: N802 - the planted words, and three general ones the loop tests propose
    return _WordEmbedder(extra=("animal", "vehicle", "plant"))


def planted_pool(tmp_path, bank: Bank, d_sae: int = 12, seed: int = 0) -> RenderPool:
    """Feature j < 8 fires on concept j (noisy); features 8..11 fire at random."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(len(bank), d_sae)
    for i, it in enumerate(bank.items):
        c = CONCEPTS.index(it.description.split()[1])
        codes[i, c] = 1.0 + torch.rand(1, generator=g).item()
        codes[i, 8:] = torch.rand(d_sae - 8, generator=g) * (torch.rand(d_sae - 8, generator=g) > 0.5)
    pool = RenderPool.open(tmp_path / "pool", {"d_sae": d_sae, "source": bank.id})
    pool.add(bank_pool_rows(bank), codes)
    return pool


class RecordingRetrieval(BankRetrieval):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = {s: set() for s in SPLITS}

    def rows(self, prompts, split, n):
        out = super().rows(prompts, split, n)
        self.seen[split].update(out.flatten().tolist())
        return out


def test_pool_scores_one_render_for_every_feature(tmp_path):
    bank = planted_bank()
    pool = planted_pool(tmp_path, bank)
    engine = NamingEngine(BankRetrieval(bank, pool, WordEmbedder(), n_controls=20), EngineConfig(n_images=5, n_controls=20))
    s = engine.score(["dog"], "search")
    assert s.shape == (1, 12)  # one prompt, all features at once
    assert int(torch.argmax(s[0, :8])) == CONCEPTS.index("dog")
    # a second ask is a cache lookup: no new rows are read
    assert engine.score(["dog"], "search") is not None and len(engine._scores["search"]) == 1


def test_auc_is_mean_mid_rank():
    ctrl = torch.tensor([[0.0], [0.0], [1.0], [2.0]])
    sc = SplitScorer(ctrl)
    acts = torch.tensor([[[0.0], [1.5], [3.0]]])  # ranks: 0.25, 0.75, 1.0
    assert torch.allclose(sc.auc(acts), torch.tensor([[(0.25 + 0.75 + 1.0) / 3]]))
    from sklearn.metrics import roc_auc_score

    y = [1, 1, 1, 0, 0, 0, 0]
    x = [0.0, 1.5, 3.0, 0.0, 0.0, 1.0, 2.0]
    assert sc.auc(acts).item() == pytest.approx(roc_auc_score(y, x))


def test_planted_concept_is_named_and_splits_never_mix(tmp_path):
    bank = planted_bank()
    pool = planted_pool(tmp_path, bank)
    renderer = RecordingRetrieval(bank, pool, WordEmbedder(), n_controls=20)
    cfg = EngineConfig(n_images=5, n_eval_images=5, n_controls=20, n_rounds=2, n_proposals=3, n_select=4)
    engine = NamingEngine(renderer, cfg)
    feats = list(range(8))
    res = engine.retrieval(feats, bank.prompts("search"))
    for j in feats:
        assert CONCEPTS[j] in res.names[j].split(), (j, res.names[j])
        assert res.auc[j] > 0.8  # the controls hold the concept too (1 in 8): the ceiling is ~0.94
    # search and selection never touched an eval render; CoSy touched only eval renders
    eval_rows = set(pool.rows_where(split="eval"))
    assert not (renderer.seen["search"] | renderer.seen["select"]) & eval_rows
    assert renderer.seen["eval"] <= eval_rows
    ctrl = set(renderer.control_rows("eval").tolist())
    assert not renderer.seen["eval"] & ctrl  # a render is never its own control


class ListProposer:
    id = "list"

    def __init__(self, words):
        self.words = words

    def propose(self, best, n, context):
        return [w for w in self.words if w not in context.tried][:n]

    def summarise(self, best):
        return best[0][1]


def test_shared_loop_lets_one_features_prompt_win_for_another(tmp_path):
    """Feature 0's proposals include "tree": feature 2 (tree) gets it as its name although its own seeds lack it."""
    bank = planted_bank()
    pool = planted_pool(tmp_path, bank)
    engine = NamingEngine(BankRetrieval(bank, pool, WordEmbedder(), n_controls=20),
                          EngineConfig(n_images=5, n_eval_images=5, n_controls=20, n_rounds=1, n_proposals=3, n_select=3))
    prop = ListProposer(["tree", "clock"])
    res = engine.mils([0, 2], ["animal", "plant"], prop, tmp_path / "state", shared=True)
    assert res.names[2] == "tree"
    solo = NamingEngine(BankRetrieval(bank, pool, WordEmbedder(), n_controls=20), engine.cfg)
    alone = solo.mils([2], {2: ["animal", "plant"]}, ListProposer(["clock"]), None, shared=False)
    assert alone.names[2] != "tree"
    # the proposals were saved: a re-run replays them without asking
    class Refuse:
        id = "refuse"

        def propose(self, *a):
            raise AssertionError("the saved round must be replayed, not asked again")

    again = NamingEngine(BankRetrieval(bank, pool, WordEmbedder(), n_controls=20), engine.cfg)
    assert again.mils([0, 2], ["animal", "plant"], Refuse(), tmp_path / "state", shared=True).names == res.names


def test_family_splits_keep_families_whole_and_shares_close():
    links = [[f"f{i // 7}"] for i in range(700)] + [["big"]] * 100
    fam, split = family_splits(links)
    by_fam = {}
    for f, s in zip(fam, split):
        by_fam.setdefault(f, set()).add(s)
    assert all(len(s) == 1 for s in by_fam.values())
    share = {s: split.count(s) / len(split) for s in SPLITS}
    assert abs(share["search"] - 0.45) < 0.03 and abs(share["eval"] - 0.35) < 0.03


def test_offline_bank_is_family_aware():
    from nacosae.naming.bank import CLDR_DIR, EMOJI_FONT

    if not (EMOJI_FONT.is_file() and CLDR_DIR.is_dir() and os.path.isdir("/usr/share/openclipart/png")):
        pytest.skip("Debian fonts-noto-color-emoji / unicode-cldr-core / openclipart-png not installed")
    from nacosae.naming.bank import offline_bank

    bank = offline_bank(progress=False)
    fam_split = {}
    for it in bank.items:
        assert fam_split.setdefault(it.family, it.split) == it.split, it
        assert it.description and "_" not in it.description
    descs = {}
    for it in bank.items:
        if not it.family.startswith("series:"):  # a series (icon theme, flags) is one family of its own
            descs.setdefault(it.description, set()).add(it.split)
    # near-copies: the 1,379 pictures described "star" (and every other repeated description) sit in one split
    assert all(len(s) == 1 for s in descs.values())
    assert len({it.split for it in bank.items if it.description == "star" and not it.family.startswith("series:")}) == 1
    sources = {it.source for it in bank.items}
    assert sources == {"openclipart", "emoji", "skimage"}
    assert 1300 <= sum(it.source == "emoji" for it in bank.items) <= 1900
    dog = [it for it in bank.items if it.description == "dog face"]
    assert dog and "pet" in dog[0].keywords


def test_pool_refuses_other_settings_and_bad_codes(tmp_path):
    pool = RenderPool.open(tmp_path / "p", {"d_sae": 4, "layer": "a"})
    with pytest.raises(PoolMismatchError, match="layer"):
        RenderPool.open(tmp_path / "p", {"d_sae": 4, "layer": "b"})
    with pytest.raises(ValueError, match="NaN or inf"):
        pool.add([{"render_id": "x", "prompt": "p", "seed": 0, "split": "search"}], torch.tensor([[float("inf"), 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        pool.add([{"render_id": "x", "prompt": "p", "seed": 0, "split": "search"}], torch.zeros(1, 3))


def test_pool_resumes_after_kill(tmp_path):
    """A process killed (SIGKILL-like `os._exit`) in the middle of filling keeps its whole chunks; the re-run encodes
    only what is missing and the pool equals an uninterrupted one."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        from nacosae.naming.pool import RenderPool, fill_pool
        pool = RenderPool.open({str(tmp_path / 'pool')!r}, {{"d_sae": 6}})
        rows = [{{"render_id": f"r{{i}}", "prompt": f"p{{i}}", "seed": 0, "split": "search"}} for i in range(50)]
        calls = []
        def encode(images):
            calls.append(len(images))
            if len(calls) == 3 and sys.argv[1] == "die":
                os._exit(9)
            return torch.stack([torch.arange(6.0) * i for i in images])
        n = fill_pool(pool, rows, lambda i: i, encode, chunk_size=8, progress=False)
        print(n, len(pool))
    """)
    r = subprocess.run([sys.executable, "-c", script, "die"], capture_output=True, text=True)
    assert r.returncode == 9
    assert len(RenderPool.open(tmp_path / "pool", {"d_sae": 6})) == 16  # two whole chunks survived
    r = subprocess.run([sys.executable, "-c", script, "live"], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["34", "50"]
    pool = RenderPool.open(tmp_path / "pool", {"d_sae": 6})
    for k in range(50):
        assert torch.equal(pool.codes([pool.row_of(f"r{k}")])[0], torch.arange(6.0) * k)


def test_nacosae_name_end_to_end_on_the_demo_sae(tmp_path):
    """`nacosae name` on the bundled demo SAE over a small family subset of the real bank: every live feature is
    attempted, unnamed rows say why, and the dataset loads the way a Hub user loads it."""
    from nacosae.naming.bank import CLDR_DIR, EMOJI_FONT

    if not (EMOJI_FONT.is_file() and CLDR_DIR.is_dir() and os.path.isdir("/usr/share/openclipart/png")):
        pytest.skip("Debian fonts-noto-color-emoji / unicode-cldr-core / openclipart-png not installed")
    import datasets

    from nacosae.naming.run import main

    out = tmp_path / "results"
    args = ["--sae", "demo/sae/efficientnet-lite0/blocks.14", "--out", str(out), "--max-bank", "250", "--n-rounds", "1",
            "--per-feature-mils", "2", "--n-controls", "20", "--n-images", "3", "--n-eval-images", "3", "--quiet"]
    assert main(args) == 0
    # the default config is `features`; a fresh cache: `datasets` keys a local folder's cache by its name and files
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 1536
    rows = ds.to_list()
    for r in rows:
        if r["unnamed_reason"] == "dead":
            assert r["name"] == "unnamed" and r["candidate_name"] is None
        else:  # attempted: a candidate with its held-out score, published only above the threshold
            assert r["candidate_name"] and r["name_cosy_auc"] is not None
            assert (r["name"] == r["candidate_name"]) == (r["name_cosy_auc"] >= 0.6)
            assert r["unnamed_reason"] in (None, "dense", "below_threshold")
    # a re-run reuses the pool: nothing is encoded again
    n_chunks = len(list((tmp_path / "results.naming" / "pool").glob("chunk-*")))
    assert main(args) == 0
    assert len(list((tmp_path / "results.naming" / "pool").glob("chunk-*"))) == n_chunks
