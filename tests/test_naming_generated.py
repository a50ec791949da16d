"""The GPU path of the naming engine on CPU (issue 8, item 5): a tiny random Stable Diffusion pipeline built from
configs renders the prompts, a tiny random open_clip ViT + a random TopK SAE encode them into the shared pool, and a
tiny chat LLM proposes for several features per call. Checks: the loop runs end to end; a (prompt, seed) pair is
rendered once and scored for every feature; eval seeds never reach search or selection; a killed run resumes without
rendering anything twice; `propose_many` answers several features from one generation (and its parser reads
hand-written answers); the GPU script runs on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nacosae.naming.engine import EngineConfig, NamingEngine
from nacosae.naming.generated import SPLIT_SEEDS, GeneratorRenderer, name_features_generated
from nacosae.naming.pool import PoolMismatchError, RenderPool
from nacosae.naming.proposers import ProposalContext, parse_feature_blocks, parse_numbered_lines
from nacosae.naming.run import encode_fn
from nacosae.sae import SAE, SAEConfig

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
D_SAE = 12
WORDS = ["dog", "cat", "red car", "stop sign", "tree", "house", "boat", "apple", "blue sky", "clock", "guitar", "bird"]
CFG = EngineConfig(n_images=2, n_eval_images=3, n_rounds=2, n_proposals=2, n_best=3, n_select=2, features_per_call=4,
                   min_gain=-1.0)  # min_gain < 0: every feature proposes every round (the batched path is exercised)


# ---------------------------------------------------------------------------------------------------------------
# tiny components (random weights, built from configs, saved and loaded by path as the real ones are)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from nacosae.naming.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", size=SIZE)


@pytest.fixture(scope="module")
def generator(pipe_dir):
    from nacosae.naming.generators import DiffusersGenerator

    return DiffusersGenerator(pipe_dir, steps=1, guidance=0.0, size=SIZE, batch_size=8)


@pytest.fixture(scope="module")
def clip_sae(tmp_path_factory):
    """A tiny open_clip ViT (random weights, 32 px, 4 patches + CLS, width 32) and a random TopK SAE on its block 0."""
    from nacosae.backbones import load_backbone

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    torch.manual_seed(0)
    backbone = load_backbone(f"open_clip:local-dir:{folder}")
    sae = SAE(SAEConfig(d_in=32, d_sae=D_SAE, k=3))
    return backbone, sae


def _controls(n: int = 10) -> list[Image.Image]:
    """Natural-image stand-ins: smooth colour gradients with noise, all different."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:32, 0:32] / 31.0
        base = np.stack([xx * (i % 3), yy * ((i + 1) % 3), (xx + yy) / 2 * (i % 2)], -1) * 120
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape) + 60, 0, 255).astype(np.uint8)))
    return out


# A word-level tokenizer (words with their leading space, "\n"-prefixed list markers and headers): what a random model
# samples comes out as lines of real pieces; unknown prompt words map to <unk>.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
PIECES = ["\n", "Feature", "\nFeature", " 1:", " 2:", " 3:", "\n1.", "\n2.", "\n3.", " red", " blue", " dog", " cat",
          " stop", " sign", " car", " tree", " a", " on", " grass"]


def _chat_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n[^\s]*| ?[^\s]+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:], chat_template=CHAT_TEMPLATE)


def _chat_model(tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A random chat LM that may write only the PIECES (and its end token): lines for the parsers to sort out."""
    tokenizer = _chat_tokenizer()
    model = _chat_model(tokenizer)
    allowed = {tokenizer.convert_tokens_to_ids(p) for p in PIECES} | {tokenizer.eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def proposer(chat_dir):
    from nacosae.naming.proposers import TransformersChatProposer

    return TransformersChatProposer(chat_dir, max_new_tokens=12)


class RecordingGenerator:
    """The real generator, recording every (prompt, seed) pair it was asked to render; `die_after` calls raise
    `Killed` (a kill in the middle of a round)."""

    def __init__(self, inner, die_after: int | None = None, refuse: bool = False):
        self.inner, self.id = inner, inner.id
        self.pairs: list[tuple[str, int]] = []
        self.die_after, self.refuse, self.calls = die_after, refuse, 0

    def render_many(self, prompts, seeds):
        if self.refuse:
            raise AssertionError(f"a pooled render was asked again: {list(zip(prompts, seeds))[:3]}")
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise Killed()
        self.pairs += list(zip(prompts, seeds))
        return self.inner.render_many(prompts, seeds)


class Killed(Exception):
    pass


def _run(gen, proposer, clip_sae, work, **kw):
    backbone, sae = clip_sae
    return name_features_generated(sae, backbone, "resblocks.0", "all", gen, proposer, _controls(), work, CFG,
                                   vocabulary=WORDS, n_seed_prompts=5, chunk_size=16, n_per_feature_mils=2,
                                   progress=False, **kw)


@pytest.fixture(scope="module")
def full_run(generator, proposer, clip_sae, tmp_path_factory):
    work = tmp_path_factory.mktemp("full")
    gen = RecordingGenerator(generator)
    calls0 = proposer.n_calls
    t0 = time.perf_counter()
    out = _run(gen, proposer, clip_sae, work)
    return out, gen, work, proposer.n_calls - calls0, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# the loop end to end


def test_the_loop_names_every_feature_end_to_end(full_run):
    out, gen, work, llm_calls, seconds = full_run
    assert [r["feature"] for r in out.rows] == list(range(D_SAE))
    s = out.summary
    live = s["n_live"]
    assert live >= D_SAE // 2 and s["n_dead"] == D_SAE - live
    for r in out.rows:
        if r["unnamed_reason"] == "dead":
            continue
        assert r["candidate_name"] and 0.0 <= r["name_cosy_auc"] <= 1.0
        assert (r["name"] == r["candidate_name"]) == (r["name_cosy_auc"] >= CFG.threshold)
        assert len(r["cosy_render_ids_pool_mils"]) == CFG.n_eval_images
        assert [h["iteration"] for h in r["pool_mils_history"]] == [0, 1, 2]  # min_gain < 0: every round ran
    assert {m["method"] for m in s["table"]} == {"pool_mils", "seeds", "mils", "random"}  # no labels: no top_label
    assert s["table"][2]["n"] == 2 and s["table"][2]["renders_per_feature"] > s["table"][0]["renders_per_feature"]
    assert "pool_mils - seeds" in s["paired"] and s["loop_gain_over_seeds"]["n"] == live
    tp = s["throughput"]
    assert tp["renders"] == len(gen.pairs) > 0 and tp["renders_per_s"] > 0 and tp["encoded_per_s"] > 0
    # several features per LLM call: 2 rounds × ceil(live / 4) batched calls (+ 2 × 1 for the per-feature loop's 2
    # features), plus per-feature fallbacks
    n_batched = 2 * -(-live // CFG.features_per_call) + 2
    assert tp["proposer_calls"] == n_batched and llm_calls == n_batched + tp["llm_fallbacks"]
    assert json.loads((work / "summary.json").read_text())["n_live"] == live
    print(f"end to end: {seconds:.1f} s, {tp['renders']} renders, {llm_calls} LLM calls")


def test_a_render_is_made_once_pooled_once_and_scored_for_every_feature(full_run, generator, clip_sae):
    out, gen, work, _, _ = full_run
    counts = Counter(gen.pairs)
    assert max(counts.values()) == 1  # no (prompt, seed) pair was rendered twice
    pool = out.pool
    renders = [r for r in pool.rows if r["split"] != "control"]
    assert len(renders) == len(gen.pairs) and len({r["render_id"] for r in pool.rows}) == len(pool)
    # every prompt has exactly its split's first seeds
    by = {}
    for r in renders:
        by.setdefault((r["prompt"], r["split"]), []).append(r["seed"])
    n_of = {"search": CFG.n_images, "select": CFG.n_images, "eval": CFG.n_eval_images}
    for (p, split), seeds in by.items():
        assert sorted(seeds) == list(SPLIT_SEEDS[split][: n_of[split]])
    # a pooled prompt scores every feature without a new render
    backbone, sae = clip_sae
    refuse = RecordingGenerator(generator, refuse=True)
    renderer = GeneratorRenderer(refuse, RenderPool.open(work / "pool", pool.meta), encode_fn(backbone, "resblocks.0", "all", sae),
                                 controls=_controls())
    engine = NamingEngine(renderer, CFG)
    prompt = next(p for (p, split) in by if split == "search")
    s = engine.score([prompt], "search")
    assert s.shape == (1, D_SAE) and torch.isfinite(s).all()


def test_eval_seeds_never_reach_search_or_selection(generator, proposer, clip_sae, tmp_path):
    backbone, sae = clip_sae

    class Recording(GeneratorRenderer):
        def rows(self, prompts, split, n):
            out = super().rows(prompts, split, n)
            self.seen.setdefault(split, set()).update(out.flatten().tolist())
            return out

    pool = RenderPool.open(tmp_path / "pool", {"d_sae": D_SAE})
    renderer = Recording(generator, pool, encode_fn(backbone, "resblocks.0", "all", sae), controls=_controls())
    renderer.seen = {}
    engine = NamingEngine(renderer, CFG)
    res = engine.mils(list(range(D_SAE)), WORDS[:4], proposer, tmp_path / "state", shared=True)
    assert res.names and set(renderer.seen) == {"search", "select", "eval"}
    eval_seeds = set(SPLIT_SEEDS["eval"])
    seed_of = {i: pool.rows[i]["seed"] for i in range(len(pool))}
    for split in ("search", "select"):
        assert not {seed_of[i] for i in renderer.seen[split]} & eval_seeds
        assert not renderer.seen[split] & renderer.seen["eval"]
    assert {seed_of[i] for i in renderer.seen["eval"]} <= eval_seeds
    controls = set(renderer.control_rows("eval").tolist())
    assert not controls & set().union(*renderer.seen.values())  # a control is never a render
    assert all(torch.equal(renderer.control_rows(s), renderer.control_rows("eval")) for s in ("search", "select"))


@pytest.fixture(scope="module")
def resumed_run(generator, proposer, clip_sae, tmp_path_factory):
    """A run killed in the middle of the loop (after 3 generator calls: the first proposal round), then run again."""
    work = tmp_path_factory.mktemp("killed")
    dying = RecordingGenerator(generator, die_after=3)
    with pytest.raises(Killed):
        _run(dying, proposer, clip_sae, work)
    assert (work / "state" / "pool_mils" / "rounds.json").is_file()  # the round's proposals were saved
    again = RecordingGenerator(generator)
    return _run(again, proposer, clip_sae, work), dying, again, work


def test_a_killed_run_resumes_without_rendering_twice(full_run, resumed_run, generator, clip_sae):
    full_work = full_run[2]
    resumed, dying, again, work = resumed_run
    done = set(dying.pairs)
    assert done and not done & set(again.pairs)  # what the killed run pooled is not rendered again
    assert Counter(again.pairs).most_common(1)[0][1] == 1
    # the killed run's saved proposals are replayed: the rounds equal an uninterrupted run's
    rounds = json.loads((work / "state" / "pool_mils" / "rounds.json").read_text())
    assert rounds == json.loads((full_work / "state" / "pool_mils" / "rounds.json").read_text())

    # a finished run replays from disk: no render, no proposal
    class Refuse:
        id = "refuse"

        def propose(self, *a):
            raise AssertionError("saved rounds must be replayed")

        def propose_many(self, *a):
            raise AssertionError("saved rounds must be replayed")

    replay = _run(RecordingGenerator(generator, refuse=True), Refuse(), clip_sae, work)
    assert [r["name"] for r in replay.rows] == [r["name"] for r in resumed.rows]


def test_a_resumed_run_equals_an_uninterrupted_one(full_run, resumed_run):
    out, gen_full, _, _, _ = full_run
    resumed, dying, again, _ = resumed_run
    assert [r["candidate_name"] for r in resumed.rows] == [r["candidate_name"] for r in out.rows]
    assert set(dying.pairs) | set(again.pairs) == set(gen_full.pairs)  # the same renders


def test_bad_settings_are_refused(generator, clip_sae, tmp_path):
    backbone, sae = clip_sae
    enc = encode_fn(backbone, "resblocks.0", "all", sae)
    pool = RenderPool.open(tmp_path / "pool", {"d_sae": D_SAE})
    with pytest.raises(ValueError, match="overlap"):
        GeneratorRenderer(generator, pool, enc, {"search": range(0, 10), "select": range(5, 15), "eval": range(20, 30)},
                          _controls())
    with pytest.raises(ValueError, match="at least 2"):
        GeneratorRenderer(generator, pool, enc, controls=_controls(1))
    r = GeneratorRenderer(generator, pool, enc, {"search": range(2), "select": range(2, 4), "eval": range(4, 6)}, _controls(3))
    with pytest.raises(ValueError, match="3 renders asked"):
        r.rows(["a dog"], "eval", 3)
    with pytest.raises(TypeError, match="PIL images or an ImageSource"):
        GeneratorRenderer(generator, pool, enc, controls=["not an image", "x"])
    backbone, sae = clip_sae
    RenderPool.open(tmp_path / "run" / "pool", {"d_sae": D_SAE, "sae": "x"})
    with pytest.raises(PoolMismatchError):
        name_features_generated(sae, backbone, "resblocks.0", "all", generator, None, _controls(), tmp_path / "run", CFG,
                                vocabulary=WORDS, progress=False)


def test_render_many_batches_across_prompts(generator):
    """Pairs of different prompts in one pipeline call give each pair's own image (one torch.Generator per image)."""
    many = generator.render_many(["a red dog", "a blue car", "a red dog"], [1, 2, 3])
    alone = [generator.render("a red dog", [1])[0], generator.render("a blue car", [2])[0], generator.render("a red dog", [3])[0]]
    for a, b in zip(many, alone):
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(many[0].image), np.asarray(many[2].image))
    with pytest.raises(ValueError, match="one seed per prompt"):
        generator.render_many(["a"], [1, 2])


# ---------------------------------------------------------------------------------------------------------------
# batched proposals


ANSWER = "Feature 1:\n1. red dog\n2. blue cat\n3. red car\nFeature 2:\n1. stop sign\n2. blue car"
REQUESTS = [([(0.9, "a dog"), (0.5, "a cat")], 3, ProposalContext(feature=7, iteration=1, tried=frozenset({"blue cat"}))),
            ([(0.8, "a sign")], 2, ProposalContext(feature=2, iteration=1)),
            ([(0.7, "a tree")], 2, ProposalContext(feature=5, iteration=1))]


def _batched_prompt_ids(tokenizer, requests) -> list[int]:
    from nacosae.naming.proposers import _CHAT_MANY_INSTRUCTIONS, format_best

    blocks = "\n\n".join(f"Feature {i}:\n{format_best(b)}" for i, (b, _, _) in enumerate(requests, 1))
    content = _CHAT_MANY_INSTRUCTIONS.format(k=len(requests), blocks=blocks, n=max(n for _, n, _ in requests))
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def trained_chat_dir(tmp_path_factory):
    """A tiny chat LM trained (teacher forcing, a few hundred steps) to answer the batched prompt of REQUESTS with
    ANSWER: blocks for features 1 and 2, none for 3. A real generation for the batched parser to read."""
    tokenizer = _chat_tokenizer()
    model = _chat_model(tokenizer, seed=1)
    prompt = _batched_prompt_ids(tokenizer, REQUESTS)
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in answer
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    assert loss.item() < 0.05
    folder = tmp_path_factory.mktemp("trained-chat")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_propose_many_reads_several_features_from_one_generation(trained_chat_dir):
    from nacosae.naming.proposers import TransformersChatProposer

    p = TransformersChatProposer(trained_chat_dir, max_new_tokens=16)
    out = p.propose_many(REQUESTS)
    assert out[0] == ["red dog", "red car"]  # "blue cat" was tried already
    assert out[1] == ["stop sign", "blue car"]
    # feature 3's block is missing: it was asked alone (one more generation)
    assert p.n_calls == 2 and p.n_fallbacks == 1 and len(out[2]) <= 2
    assert p.propose_many(REQUESTS) == out  # seeded: a resumed run repeats the call
    assert p.propose_many(REQUESTS[:1]) == [p.propose(*REQUESTS[0])]  # one feature: the plain prompt


def test_feature_block_parser_on_hand_written_answers():
    text = ("Sure! Here are new descriptions.\n\n**Feature 1:**\n1. a red stop sign\n2. \"octagonal sign\" (0.9)\n\n"
            "### Feature 2\n- a spotted dog\n- a dalmatian\n\nFeature 4: (stop signs)\n1. ignored: out of range\n"
            "FEATURE #3 - fur texture\n1. black spots on white fur\n1. feature film poster\nfeature 1\n3. red octagon")
    blocks = parse_feature_blocks(text, 3)
    assert set(blocks) == {1, 2, 3}
    assert parse_numbered_lines(blocks[1], 5) == ["a red stop sign", "octagonal sign", "red octagon"]
    assert parse_numbered_lines(blocks[2], 5) == ["a spotted dog", "a dalmatian"]
    # the header's own text is a line of the block; "1. feature film poster" is an item, not a header
    assert parse_numbered_lines(blocks[3], 5) == ["black spots on white fur", "feature film poster"]
    assert "fur texture" in blocks[3] and "out of range" not in " ".join(blocks.values())
    assert parse_feature_blocks("1. a dog\n2. a cat", 2) == {}  # no headers: every feature falls back
    assert parse_feature_blocks("Features 1-2 share dogs.\nFeature 2:\n1. a dog", 2) == {2: "1. a dog"}


# ---------------------------------------------------------------------------------------------------------------
# the GPU script, on CPU


def test_gpu_script_runs_on_cpu(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_name_tiny_clip.py"), "--device", "cpu", "--tiny",
                        "--work-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "renders/s" in r.stdout and "encode/s" in r.stdout and "proposer calls/s" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_live"] > 0 and summary["throughput"]["renders"] > 0
    assert {m["method"] for m in summary["table"]} == {"pool_mils", "seeds", "top_label", "random"}  # labelled controls
    assert seconds < 60, f"the --tiny CPU run took {seconds:.0f} s"
