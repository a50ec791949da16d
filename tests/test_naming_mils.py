"""The MILS loop end to end on the offline path: Open Clip Art as a described image bank (MiniLM retrieval), a feature
planted on one image category, and the scripted and vocabulary proposers. Plus resumability and the state file."""

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from nacosae.naming.baselines import random_word_names
from nacosae.naming.generators import DescribedImageBank, RetrievalGenerator, TextEmbedder
from nacosae.naming.mils import MILSConfig, MILSState, new_state, run_mils, seed_prompts
from nacosae.naming.proposers import ScriptedProposer, VocabularyProposer
from nacosae.naming.vocab import OPENCLIPART_DIR, load_vocabulary

pytestmark = pytest.mark.skipif(not OPENCLIPART_DIR.is_dir(), reason="Debian openclipart-png not installed")
CATEGORIES = ("animals", "food", "transportation", "plants", "tools", "buildings")


def _digest(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


class PlantedCategoryFeature:
    """A "feature" that fires (1.0) on images of one Open Clip Art category and not (0.0) on others. It sees pixels
    only: images are recognised by a hash of their pixels, so it is scored exactly as a real scorer would be called."""

    def __init__(self, bank: DescribedImageBank, category: str):
        self.category_of = {_digest(bank.load_image(i)): bank.labels[i] for i in range(len(bank))}
        self.category = category
        self.n_images = 0

    def score(self, images, features):
        self.n_images += len(images)
        return torch.tensor([[float(self.category_of[_digest(im)] == self.category)] * len(features) for im in images])


def _pixels(path) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                return im.width * im.height
    except Image.DecompressionBombError:  # Open Clip Art has one 623-megapixel file
        return 10**12


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    paths = []
    for c in CATEGORIES:  # 20 small images (≤ 1 MP: fast to decode) spread over each category's folders
        files = [f for f in sorted((OPENCLIPART_DIR / c).rglob("*.png")) if _pixels(f) <= 1_000_000]
        paths += files[:: max(1, len(files) // 20)][:20]
    return DescribedImageBank.from_openclipart(OPENCLIPART_DIR, paths=paths, embedder=TextEmbedder(),
                                               cache_dir=tmp_path_factory.mktemp("bank"))


@pytest.fixture(scope="module")
def animals(bank):
    return PlantedCategoryFeature(bank, "animals")


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def test_retrieval_seed_is_the_rank_of_the_match(bank):
    gen = RetrievalGenerator(bank)
    r = gen.render("a dog", [0, 1, 2, 3])
    assert len({x.ref for x in r}) == 4  # every seed a different image
    again = gen.render("a dog", [2])[0]
    assert again.ref == r[2].ref and again.image.tobytes() == r[2].image.tobytes()
    assert again.image.mode == "RGB"
    assert all(bank.labels[bank.paths.index(Path(x.ref))] == "animals" for x in r[:2])
    food = gen.render("bread and cheese", [0])[0].ref
    assert "/food/" in food
    with pytest.raises(ValueError, match="out of range"):
        gen.render("a dog", [len(bank)])


def test_bank_embeddings_are_cached(bank, tmp_path):
    first = DescribedImageBank.build(bank.paths[:5], bank.descriptions[:5], bank.labels[:5], bank.embedder, tmp_path)
    assert len(list(tmp_path.glob("bank_embeddings_*.safetensors"))) == 1

    class NoEncode:  # the second build must read the cache, not embed
        id = bank.embedder.id

        def encode(self, texts):
            raise AssertionError("embeddings were recomputed although cached")

    second = DescribedImageBank.build(bank.paths[:5], bank.descriptions[:5], bank.labels[:5], NoEncode(), tmp_path)
    assert torch.equal(first.embeddings_NE, second.embeddings_NE)
    assert torch.allclose(first.embeddings_NE.norm(dim=1), torch.ones(5), atol=1e-5)


def test_scripted_loop_finds_the_planted_category(bank, animals):
    script = [["a car", "an apple", "a hammer", "a tree"], ["a red bus", "a cat", "a loaf of bread"],
              ["a house", "a dog", "a bird"]]
    cfg = MILSConfig(n_iterations=3, n_candidates=4, n_best=3, n_images=3)
    before = animals.n_images
    state = run_mils(new_state(7, ["a bicycle", "a pizza"]), ScriptedProposer(script), RetrievalGenerator(bank), animals, cfg,
                     progress=False)
    # every distinct image scored once: "a cat" and "a dog" share bank images, whose scores are reused
    refs = [ref for c in state.candidates for ref in c.refs]
    assert animals.n_images - before == len(set(refs)) < len(refs)
    assert state.done and state.iteration == 3
    scores = {c.prompt: c.score for c in state.candidates}
    assert scores["a cat"] == scores["a dog"] == 1.0
    assert max(scores[p] for p in ("a car", "an apple", "a hammer", "a tree", "a bicycle", "a pizza", "a house")) < 0.5
    assert state.best[0] == (1.0, "a cat")  # first of the ties in the order scored (equal length)
    assert state.name == "a cat"
    # the history tells the story: one record per step, with scores and render references
    assert [h["step"] for h in state.history] == ["seed", "propose", "propose", "propose", "summarise"]
    cat = next(c for c in state.candidates if c.prompt == "a cat")
    assert len(cat.refs) == 3 and all("/animals/" in ref for ref in cat.refs) and cat.iteration == 2


def test_vocabulary_loop_names_the_category_on_held_out_renders(bank, animals, vocab):
    """No LLM: WordNet moves and attributes. The name must fire the feature on renders the loop never saw."""
    cfg = MILSConfig(n_iterations=4, n_candidates=10, n_best=5, n_images=3, seed=0)
    gen = RetrievalGenerator(bank)
    state = run_mils(new_state(0, seed_prompts(vocab, 10, seed=0)), VocabularyProposer(vocab), gen, animals, cfg,
                     progress=False)
    assert state.best[0][0] == 1.0 and len(state.candidates) > 30

    def held_out(prompt):
        return animals.score([r.image for r in gen.render(prompt, cfg.eval_seeds(8))], [0]).mean().item()

    floor = sum(held_out(w) for w in random_word_names(vocab.words, 12, seed=1)) / 12
    assert held_out(state.name) >= 0.6 > floor + 0.3, (state.name, held_out(state.name), floor)


def test_chunked_runs_equal_one_uninterrupted_run(bank, animals, vocab, tmp_path):
    cfg = MILSConfig(n_iterations=3, n_candidates=5, n_best=4, n_images=2, seed=3)
    gen, proposer = RetrievalGenerator(bank), VocabularyProposer(vocab)
    seeds = seed_prompts(vocab, 6, seed=3, hints=["lion"])
    whole = run_mils(new_state(1, seeds, hints=["lion"]), proposer, gen, animals, cfg, progress=False)

    path = tmp_path / "state.json"
    new_state(1, seeds, hints=["lion"]).save(path)
    n_chunks = 0
    while not MILSState.load(path).done:  # each chunk in a "fresh process": state only through the JSON file
        state = run_mils(MILSState.load(path), VocabularyProposer(vocab), gen, animals, cfg, time_budget_s=0.0, progress=False)
        state.save(path)
        n_chunks += 1
    assert n_chunks == cfg.n_iterations + 2  # a zero budget still makes one step per call: seed, 3 rounds, summary

    def timeless(s):
        d = s.to_dict()
        d.pop("elapsed_s")
        for h in d["history"]:
            h.pop("seconds")
        return d

    assert timeless(MILSState.load(path)) == timeless(whole)
    assert whole.seeds[0] == "lion"  # top-image hints come first among the seeds


def test_eval_seeds_never_used_by_the_loop(bank, animals):
    cfg = MILSConfig(n_iterations=1, n_candidates=2, n_best=2, n_images=3)
    assert not set(cfg.eval_seeds(50)) & set(cfg.loop_seeds) and len(set(cfg.eval_seeds(50))) == 50
    gen = RetrievalGenerator(bank)
    state = run_mils(new_state(0, ["a dog"]), ScriptedProposer([["a cat"]]), gen, animals, cfg, progress=False)
    for c in state.candidates:  # per prompt: the held-out renders are other images than the ones the loop scored
        held_out = {r.ref for r in gen.render(c.prompt, cfg.eval_seeds(4))}
        assert len(c.refs) == 3 and len(held_out) == 4 and not held_out & set(c.refs)


def test_state_json_round_trip_and_guards(bank, animals, tmp_path):
    cfg = MILSConfig(n_iterations=1, n_candidates=2, n_best=2, n_images=2)
    state = run_mils(new_state(5, ["a dog", "a car"], hints=["fox"]), ScriptedProposer([["a cat", "a bus"]]),
                     RetrievalGenerator(bank), animals, cfg, progress=False)
    path = state.save(tmp_path / "s.json")
    loaded = MILSState.load(path)
    assert loaded == state and loaded.best == state.best and isinstance(loaded.best[0], tuple)
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["feature"] == 5 and raw["name"] == state.name
    raw["schema_version"] = 99
    with pytest.raises(ValueError, match="schema"):
        MILSState.from_dict(raw)
    with pytest.raises(ValueError, match="same MILSConfig"):
        run_mils(loaded, ScriptedProposer([["x"]]), RetrievalGenerator(bank), animals, MILSConfig(n_images=5), progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        new_state(0, ["", "  "])
    with pytest.raises(ValueError, match="render_template"):
        MILSConfig(render_template="a photo")


def test_time_budget_stops_between_steps(bank, animals):
    cfg = MILSConfig(n_iterations=50, n_candidates=2, n_best=2, n_images=1)
    state = new_state(0, ["a dog"])
    state = run_mils(state, ScriptedProposer([["a cat", "a cow"]] + [[f"a dog number {i}"] for i in range(60)]),
                     RetrievalGenerator(bank), animals, cfg, time_budget_s=0.5, progress=False)
    assert not state.done and 1 <= len(state.history) < 52
