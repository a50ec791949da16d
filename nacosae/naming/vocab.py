"""The concept vocabulary the naming loop seeds from and the vocabulary baselines pick from (METHODS §3.1 step 1, §3.2-3.3).

Four parts, each a text file under `nacosae/naming/data/` (built once from the Debian packages by `main()` below and
shipped, so the library needs neither WordNet nor Open Clip Art installed):

- `wordnet_nouns.tsv`: a few thousand concrete, visual WordNet 3.0 nouns (first sense under physical_entity, in the
  animal / artifact / body / food / object / plant / shape / substance / ... lexicographer files, attested in SemCor),
  each with its hypernym path, hyponyms and siblings (the neighbours `VocabularyProposer` moves along). Licence:
  `WORDNET_LICENSE.txt` (WordNet 3.0 licence, permissive).
- `visual_attributes.txt`: colours, shapes, textures and rendering styles ("silhouette", "outline", "pattern", ...).
- `openclipart_categories.txt`: Open Clip Art folder names ("big cats", "jigsaw", "flags"), public domain, and
  `openclipart_filename_words.txt`: the English file-name words of that collection, author names removed (used by
  `openclipart_bank_description` to describe the retrieval bank's images).
- The 1000 ImageNet class names (as the EfficientNet backbone labels its logits).

The 20k-word Google Web Trillion Word list used by CLIP-Dissect and Discover-then-Name is LDC-licensed: not shipped.

Rebuild the data files:
    python -m nacosae.naming.vocab --wordnet-dir /usr/share/wordnet --openclipart-dir /usr/share/openclipart/png
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nacosae.images import OPENCLIPART_ROOT

DATA_DIR = Path(__file__).parent / "data"
WORDNET_DIR = Path("/usr/share/wordnet")
OPENCLIPART_DIR = Path(OPENCLIPART_ROOT)  # the root is owned by nacosae.images
SOURCES = ("wordnet", "imagenet", "openclipart", "attributes")

# WordNet noun lexicographer files whose members are things one can see (lexnames(5WN)).
_VISUAL_LEXFILES = {
    5: "animal", 6: "artifact", 8: "body", 13: "food", 17: "object", 18: "person", 20: "plant", 25: "shape",
    27: "substance",
}
# Of the noun.person words, keep those that name what a person looks like rather than a relation ("friend", "heir").
_VISUAL_PERSON = {"male", "female", "juvenile", "adult", "worker", "skilled worker", "serviceman", "athlete",
                  "contestant", "player", "performer", "musician", "entertainer", "religious person", "military officer"}
_PHYSICAL_ENTITY = 1930  # synset offset of physical_entity.n.01 in WordNet 3.0
# Top-of-hierarchy synsets too abstract to be a name (they would summarise every feature as "object").
_ABSTRACT = {
    "entity", "physical entity", "abstraction", "object", "whole", "artifact", "artefact", "living thing", "organism",
    "being", "unit", "matter", "causal agent", "cause", "instrumentality", "instrumentation", "thing", "part",
    "portion", "relation", "group", "physical object", "natural object", "chordate", "vertebrate", "craniate",
    "placental", "eutherian mammal", "individual", "someone", "somebody", "mortal", "soul", "commodity", "solid",
    "nutrient", "region", "conveyance", "component", "constituent", "element", "stuff", "creation", "form",
    "phenomenon", "process", "natural process", "attribute", "property", "article", "vascular plant",
}
_STOP = {
    "and", "the", "with", "for", "from", "new", "old", "simple", "version", "copy", "draft", "clip", "clipart", "art",
    "png", "svg", "sketch", "drawing", "image", "picture", "file", "one", "two", "de", "del", "della", "di", "la",
    "le", "les", "des", "von", "van", "der", "und", "con", "per", "una", "uno", "not", "set", "misc", "miscellany",
    "other", "others", "unsorted", "duplicates", "special", "examples", "example", "generic", "stock", "theme",
}
# Open Clip Art tokens that are English words but name an icon theme, toolkit, or author, not the picture.
_OPENCLIPART_BLOCK = {
    "gnome", "mime", "aiga", "etiquette", "lemon", "flat", "rpg", "bwh", "int", "plastik", "tango", "crystal",
    "nuvola", "kde", "emblem", "step", "stock", "vector", "remix", "tux", "inkscape", "lumen", "lamb", "architetto",
}
_NOISE_FOLDERS = {"special", "unsorted", "duplicates", "examples", "miscellany", "etiquette-theme", "flat-theme",
                  "lemon-theme", "generic", "stock", "00_strawberry_border", "01_gift_certificate", "cd_player"}


@dataclass(frozen=True)
class WordEntry:
    """One WordNet noun with the neighbours the vocabulary proposer can move to (first sense only)."""

    word: str
    """The lemma, spaces between words ("stop sign")."""
    hypernyms: tuple[str, ...] = ()
    """The first-hypernym path upwards, most specific first, without the abstract top ("dog" → "canine", "carnivore")."""
    hyponyms: tuple[str, ...] = ()
    """Direct hyponyms, most frequent first ("dog" → "puppy", "toy dog", ...)."""
    siblings: tuple[str, ...] = ()
    """Other hyponyms of the first hypernym ("dog" → "wolf", "fox", ...)."""


@dataclass
class ConceptVocabulary:
    """An ordered, de-duplicated list of concept words, with where each came from and the WordNet neighbours."""

    words: list[str]
    sources: dict[str, list[str]]
    entries: dict[str, WordEntry] = field(default_factory=dict)
    attributes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.words)

    def neighbours(self, word: str) -> list[str]:
        """Hypernyms, hyponyms and siblings of `word` (its last word, if the phrase itself is not in WordNet)."""
        e = self.entry(word)
        return [] if e is None else list(dict.fromkeys(e.hypernyms[:3] + e.hyponyms + e.siblings))

    def entry(self, word: str) -> WordEntry | None:
        word = normalise(word)
        if word in self.entries:
            return self.entries[word]
        for cand in (_singular(word), word.split(" ")[-1], _singular(word.split(" ")[-1])):
            if cand in self.entries:
                return self.entries[cand]
        return None

    def hypernym_path(self, word: str) -> tuple[str, ...]:
        """`word` followed by its hypernym path (just `(word,)` when WordNet does not know it)."""
        e = self.entry(word)
        return (normalise(word),) if e is None else (e.word,) + e.hypernyms

    def sample(self, n: int, seed: int = 0, source: str | None = None) -> list[str]:
        """`n` distinct words drawn uniformly (from one source if named), reproducible from `seed`."""
        pool = self.words if source is None else self.sources.get(source, [])
        if not pool:
            raise ValueError(f"the vocabulary has no words from source {source!r}; it has {sorted(self.sources)}")
        return random.Random(seed).sample(pool, min(n, len(pool)))


def normalise(text: str) -> str:
    """Lower case, one space between words, no surrounding punctuation: the form prompts are compared in."""
    text = re.sub(r"[_\s]+", " ", text.strip().lower())
    return text.strip(" .,;:!?\"'`()[]{}*-")


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


@lru_cache(maxsize=1)
def wordnet_entries() -> dict[str, WordEntry]:
    """The shipped WordNet nouns with their neighbours, keyed by word."""
    out = {}
    for line in _read_lines(DATA_DIR / "wordnet_nouns.tsv"):
        word, hyper, hypo, sib = (line.split("\t") + ["", "", ""])[:4]
        split = lambda s: tuple(w for w in s.split("|") if w)  # noqa: E731
        out[word] = WordEntry(word, split(hyper), split(hypo), split(sib))
    return out


@lru_cache(maxsize=1)
def visual_attributes() -> list[str]:
    """Colours, shapes, textures and styles: the words the vocabulary proposer adds to a prompt."""
    return _read_lines(DATA_DIR / "visual_attributes.txt")


@lru_cache(maxsize=1)
def openclipart_categories() -> list[str]:
    return _read_lines(DATA_DIR / "openclipart_categories.txt")


@lru_cache(maxsize=1)
def openclipart_filename_words() -> frozenset[str]:
    return frozenset(_read_lines(DATA_DIR / "openclipart_filename_words.txt"))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, normalised (the list the EfficientNet backbone labels its logits with)."""
    from nacosae.backbones import imagenet_class_names as names

    return [normalise(name) for name in names()]


def load_vocabulary(sources: tuple[str, ...] = SOURCES) -> ConceptVocabulary:
    """The concept vocabulary from the named parts, in order, duplicates (after `normalise`) kept once."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown vocabulary sources {sorted(unknown)}; choose from {SOURCES}")
    entries = wordnet_entries()
    parts = {
        "wordnet": list(entries),
        "imagenet": imagenet_class_names(),
        "openclipart": openclipart_categories(),
        "attributes": visual_attributes(),
    }
    by_source = {s: [normalise(w) for w in parts[s]] for s in sources}
    words = list(dict.fromkeys(w for s in sources for w in by_source[s] if w))
    return ConceptVocabulary(words, by_source, dict(entries), list(visual_attributes()))


def openclipart_bank_description(rel_path: str | Path) -> str:
    """The per-feature pipeline's retrieval text for an Open Clip Art image: its English file-name words (the one
    description function, `nacosae.naming.bank.openclipart_description`), then its folders, most specific first.

    `animals/mammals/big_cats/lion_roaring_john_doe_01.png` → "lion roaring; big cats, mammals, animals".
    """
    from nacosae.naming.bank import openclipart_description

    parts = Path(rel_path).parts
    folders = [_clean_folder(p) for p in reversed(parts[:-1]) if p.lower() not in _NOISE_FOLDERS]
    folders = [f for f in dict.fromkeys(folders) if f]
    head = openclipart_description(rel_path, folder_fallback=False)[0]
    tail = ", ".join(folders)
    return f"{head}; {tail}" if head and tail else (head or tail or "clip art")


def _clean_folder(name: str) -> str:
    name = re.sub(r"[-_]+", " ", name.lower()).replace(" theme", "")
    return " ".join(t for t in name.split() if t not in _STOP and not t.isdigit())


def _filename_tokens(name: str) -> list[str]:
    stem = re.sub(r"\.(png|svg|jpg)$", "", name.lower())
    return [t for t in re.split(r"[^a-z]+", stem) if len(t) >= 3]


# ----------------------------------------------------------------------------------------------------------------
# Building the data files from the Debian packages (run once by a maintainer; the outputs are committed).


@dataclass
class _Synset:
    lexfile: int
    words: list[str]
    hypernyms: list[int]
    hyponyms: list[int]
    instance: bool


def _parse_wordnet_data(path: Path) -> dict[int, _Synset]:
    out = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            offset, lexfile, n_words = int(fields[0]), int(fields[1]), int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptr = int(fields[i])
            hyper, hypo, instance = [], [], False
            for p in range(n_ptr):
                sym, target, pos = fields[i + 1 + 4 * p], int(fields[i + 2 + 4 * p]), fields[i + 3 + 4 * p]
                if pos != "n":
                    continue
                if sym in ("@", "@i"):
                    hyper.append(target)
                    instance |= sym == "@i"
                elif sym in ("~", "~i"):
                    hypo.append(target)
            out[offset] = _Synset(lexfile, words, hyper, hypo, instance)
    return out


def _parse_wordnet_index(path: Path) -> dict[str, list[int]]:
    out = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            n_synsets, n_ptr = int(fields[2]), int(fields[3])
            out[fields[0]] = [int(x) for x in fields[6 + n_ptr: 6 + n_ptr + n_synsets]]
    return out


def _noun_counts(path: Path) -> dict[tuple[str, int], int]:
    """SemCor tag count of each (noun lemma, sense number) (cntlist.rev: `lemma%1:... sense_number count`)."""
    out: dict[tuple[str, int], int] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            key, sense, count = line.split()
            lemma, _, rest = key.partition("%")
            if rest.startswith("1:"):
                out[(lemma, int(sense))] = int(count)
    return out


def _nice(word: str) -> str | None:
    """The WordNet form as a vocabulary word, or None for proper nouns, odd characters and long phrases."""
    word = re.sub(r"\(.*\)$", "", word)
    if word != word.lower() or not re.fullmatch(r"[a-z][a-z\-_']*[a-z]", word) or word.count("_") > 1:
        return None
    return word.replace("_", " ")


def build_wordnet_nouns(wordnet_dir: Path = WORDNET_DIR, max_words: int = 4000, n_neighbours: int = 8,
                       max_sense: int = 3) -> list[WordEntry]:
    """Concrete, visual WordNet nouns attested in SemCor, most frequent first, with their neighbours (of the sense kept)."""
    wordnet_dir = Path(wordnet_dir)
    if not (wordnet_dir / "data.noun").exists():
        raise FileNotFoundError(f"no WordNet database in {wordnet_dir}: install the Debian package wordnet-base")
    synsets = _parse_wordnet_data(wordnet_dir / "data.noun")
    index = _parse_wordnet_index(wordnet_dir / "index.noun")
    sense_counts = _noun_counts(wordnet_dir / "cntlist.rev")
    freq: dict[str, int] = {}
    for (lemma, _), c in sense_counts.items():
        freq[lemma] = freq.get(lemma, 0) + c

    @lru_cache(maxsize=None)
    def physical(offset: int) -> bool:
        s = synsets[offset]
        return offset == _PHYSICAL_ENTITY or any(physical(h) for h in s.hypernyms)

    def name_of(offset: int) -> str | None:
        return next((w for w in map(_nice, synsets[offset].words) if w), None)

    def rank(words):
        words = [w for w in dict.fromkeys(words) if w]
        return sorted(words, key=lambda w: (-freq.get(w.replace(" ", "_"), 0), w))[:n_neighbours]

    chosen = []
    for lemma, offsets in index.items():
        counts = [sense_counts.get((lemma, i + 1), 0) for i in range(len(offsets))]
        total = sum(counts)
        # the most frequent of the first `max_sense` senses that is a visible thing and a real share of the word's use
        # ("tiger": the big cat; not "story": a floor of a building, rare next to the narrative)
        for off, count in zip(offsets[:max_sense], counts):
            s = synsets[off]
            form = next((w for w in s.words if w.lower() == lemma), None)
            word = _nice(form) if form else None
            if (word and len(word) >= 3 and not s.instance and s.lexfile in _VISUAL_LEXFILES and physical(off)
                    and count >= max(1, 0.3 * total)):
                chosen.append((total, word, off))
                break
    chosen.sort(key=lambda t: (-t[0], t[1]))
    entries = []
    for _, word, off in chosen:
        path, cur = [], off
        while synsets[cur].hypernyms:
            cur = synsets[cur].hypernyms[0]
            name = name_of(cur)
            if name and name not in _ABSTRACT and name != word:
                path.append(name)
        if synsets[off].lexfile == 18 and not _VISUAL_PERSON & set(path):
            continue
        path = path[:6]
        hyponyms = rank(name_of(h) for h in synsets[off].hyponyms)
        parent = synsets[off].hypernyms[:1]
        siblings = rank(name_of(h) for p in parent for h in synsets[p].hyponyms if h != off)
        entries.append(WordEntry(word, tuple(dict.fromkeys(path)), tuple(hyponyms), tuple(w for w in siblings if w != word)))
        if len(entries) == max_words:
            break
    return entries


def build_openclipart_words(root: Path, wordnet_dir: Path = WORDNET_DIR, min_files: int = 1) -> tuple[list[str], list[str]]:
    """(folder names, file-name words) of Open Clip Art, keeping English words that are not parts of author names.

    A token is English if it (or its singular) is a WordNet lemma with a lower-case form. It is taken as part of an
    author's name, and dropped, when in most of its files it sits next to the same token that is *not* an English
    word (e.g. "park" next to "benji", "gates" next to "matthew").
    """
    root = Path(root)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    if not files:
        raise FileNotFoundError(f"no PNG files under {root}: install the Debian package openclipart-png")
    english = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for syn in _parse_wordnet_data(Path(wordnet_dir) / f"data.{pos}").values():
            english.update(w.lower() for w in syn.words if w == w.lower())
        if pos == "noun":  # place names are good descriptions of flags and maps ("ireland", "algeria")
            english.update(w.lower() for syn in _parse_wordnet_data(Path(wordnet_dir) / "data.noun").values()
                           if syn.lexfile == 15 for w in syn.words)
    english = {re.sub(r"\(.*\)$", "", w) for w in english}

    def is_english(t):
        return t in english or _singular(t) in english

    # the same file is often filed in several folders: count each file name once
    tokens_per_file = [set(_filename_tokens(name)) for name in sorted({f.name for f in files})]
    count, pair = Counter(), defaultdict(Counter)
    for toks in tokens_per_file:
        for t in toks:
            count[t] += 1
            for u in toks - {t}:
                pair[t][u] += 1
    words = []
    for t, n in count.items():
        if n < min_files or t in _STOP or t in _OPENCLIPART_BLOCK or not is_english(t):
            continue
        partner = [u for u, c in pair[t].items() if c >= max(2, 0.6 * n) and not is_english(u) and u not in _OPENCLIPART_BLOCK]
        if partner and n >= 2:
            continue
        words.append(t)
    folders = sorted({_clean_folder(p) for f in files for p in f.parts[:-1] if p.lower() not in _NOISE_FOLDERS} - {""})
    return folders, sorted(words)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild the vocabulary data files in nacosae/naming/data/ from Debian packages.")
    ap.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR, help="WordNet 3.0 database (Debian wordnet-base)")
    ap.add_argument("--openclipart-dir", type=Path, default=OPENCLIPART_DIR, help="Open Clip Art PNGs (Debian openclipart-png)")
    ap.add_argument("--max-words", type=int, default=4000, help="how many WordNet nouns to keep, most frequent first")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output folder")
    args = ap.parse_args(argv)
    from nacosae.io import atomic_write_text

    entries = build_wordnet_nouns(args.wordnet_dir, args.max_words)
    header = ("# Concrete visual WordNet 3.0 nouns (built by nacosae.naming.vocab from Debian wordnet-base; licence in "
              "WORDNET_LICENSE.txt).\n# word<TAB>hypernym path<TAB>hyponyms<TAB>siblings, lists separated by '|'\n")
    rows = ["\t".join([e.word, "|".join(e.hypernyms), "|".join(e.hyponyms), "|".join(e.siblings)]) for e in entries]
    atomic_write_text(args.out / "wordnet_nouns.tsv", header + "\n".join(rows) + "\n")
    folders, words = build_openclipart_words(args.openclipart_dir, args.wordnet_dir)
    note = "# from Debian openclipart-png (public domain), built by nacosae.naming.vocab\n"
    atomic_write_text(args.out / "openclipart_categories.txt", note + "\n".join(folders) + "\n")
    atomic_write_text(args.out / "openclipart_filename_words.txt", note + "\n".join(words) + "\n")
    print(f"{len(entries)} WordNet nouns, {len(folders)} Open Clip Art folders, {len(words)} file-name words → {args.out}")


if __name__ == "__main__":
    main()
