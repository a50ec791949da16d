"""The shipped concept vocabulary: its parts, its WordNet neighbours, and the Open Clip Art descriptions."""

from pathlib import Path

import pytest

from nacosae.naming.vocab import (
    DATA_DIR,
    OPENCLIPART_DIR,
    WORDNET_DIR,
    build_wordnet_nouns,
    imagenet_class_names,
    load_vocabulary,
    normalise,
    openclipart_bank_description,
    visual_attributes,
    wordnet_entries,
)


def test_vocabulary_parts_sizes_and_dedup():
    v = load_vocabulary()
    assert 3000 <= len(v.sources["wordnet"]) <= 5000
    assert len(v.sources["openclipart"]) > 100 and len(v.sources["attributes"]) > 50
    assert len(v.words) == len(set(v.words)) and all(w == normalise(w) and w for w in v.words)
    for word in ("dog", "bicycle", "jigsaw", "striped", "silhouette", "outline", "pattern", "big cats"):
        assert word in v.words, word
    assert len(imagenet_class_names()) == 1000
    assert len(v.sources["imagenet"]) == 1000 and "goldfish" in v.words
    only_wordnet = load_vocabulary(("wordnet",))
    assert only_wordnet.words == v.sources["wordnet"]
    with pytest.raises(ValueError, match="unknown vocabulary sources"):
        load_vocabulary(("google20k",))


def test_concrete_visual_nouns_only():
    words = set(wordnet_entries())
    # concrete things in, abstractions, relations and proper nouns out
    assert {"dog", "tree", "car", "apple", "hammer", "house"} <= words
    assert not {"idea", "freedom", "friend", "justice", "paris", "monday", "effect"} & words
    assert all(w == w.lower() for w in words)


def test_wordnet_neighbours():
    v = load_vocabulary()
    assert v.hypernym_path("dog")[:3] == ("dog", "canine", "carnivore")
    assert "animal" in v.hypernym_path("dogs")  # plural falls back to the singular
    e = v.entry("dog")
    assert "puppy" in e.hyponyms and "wolf" in e.siblings
    assert v.neighbours("unknownword") == [] and v.hypernym_path("unknownword") == ("unknownword",)
    assert v.sample(5, seed=1) == v.sample(5, seed=1) != v.sample(5, seed=2)


def test_no_ldc_wordlist_shipped():
    # The Google Web Trillion Word 20k list (LDC terms) must not ship: only our files and their licence notes.
    names = {p.name for p in DATA_DIR.iterdir()}
    assert names <= {"wordnet_nouns.tsv", "visual_attributes.txt", "openclipart_categories.txt",
                     "openclipart_filename_words.txt", "WORDNET_LICENSE.txt"}
    assert "Princeton" in (DATA_DIR / "WORDNET_LICENSE.txt").read_text()


def test_visual_attributes():
    attrs = visual_attributes()
    assert {"red", "striped", "silhouette", "outline", "pattern", "round"} <= set(attrs)


@pytest.mark.parametrize("rel, expected", [
    ("animals/mammals/dogs/bored_dog_01.png", "bored dog; dogs, mammals, animals"),
    ("shapes/jigsaw/jigsaw_blue_05.png", "jigsaw blue; jigsaw, shapes"),
    ("logos/velocette_frank_warttig_01.png", "logos"),  # author names dropped
    ("computer/icons/etiquette-theme/filesystems/gnome-fs-trash-empty.png", "trash empty; filesystems, icons, computer"),
    ("special/gradients/gradient-lavender.png", "gradient lavender; gradients"),
])
def test_openclipart_bank_description(rel, expected):
    assert openclipart_bank_description(rel) == expected


@pytest.mark.slow
@pytest.mark.skipif(not (Path(WORDNET_DIR) / "data.noun").exists(), reason="Debian wordnet-base not installed")
def test_build_from_wordnet_matches_shipped_file():
    built = build_wordnet_nouns(WORDNET_DIR, max_words=200)
    shipped = list(wordnet_entries().values())[:200]
    assert built == shipped


@pytest.mark.skipif(not OPENCLIPART_DIR.is_dir(), reason="Debian openclipart-png not installed")
def test_every_openclipart_image_gets_a_description():
    rels = [p.relative_to(OPENCLIPART_DIR) for p in sorted(OPENCLIPART_DIR.rglob("*.png"))[::50]]
    descs = [openclipart_bank_description(r) for r in rels]
    assert all(d and "architetto" not in d for d in descs)
