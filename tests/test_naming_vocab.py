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


# -- Discover-then-Name (METHODS §3.2) on a tiny random CLIP built from a config -------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A transformers CLIPModel with random weights, its tokenizer (letters only) and image processor, saved to disk
    and loaded the way a user loads a Hub CLIP (`load_backbone("hf:<folder>")`)."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from nacosae.backbones import load_backbone

    folder = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 28 for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return load_backbone(f"hf:{folder}")


WORDS = ["cat", "dog", "tree", "car", "house", "striped", "bird", "boat"]


def _sae_on(backbone, layer, d_sae=6):
    import torch

    from nacosae.sae import SAE, SAEConfig

    torch.manual_seed(1)
    return SAE(SAEConfig(d_in=backbone.d(layer), d_sae=d_sae, k=2, input_scale=2.5,
                         provenance=backbone.provenance(layer, "all")))


def test_vocab_names_features_of_an_sae_on_clips_image_embedding(tiny_clip):
    import torch
    import torch.nn.functional as F

    from nacosae.naming.baselines import VocabularyNamer, vocabulary_names

    sae = _sae_on(tiny_clip, "embedding")
    assert sae.cfg.d_in == 16  # the projection width: where the text embeddings live
    text = tiny_clip.encode_text(WORDS)
    with torch.no_grad():  # plant: feature 0 points at "tree", feature 1 at "boat" (scaled: only the direction counts)
        sae.W_dec[0] = 7.0 * text[2]
        sae.W_dec[1] = 0.3 * text[7] + 0.01 * torch.randn(16)
    names = vocabulary_names(sae, tiny_clip, WORDS)  # layer from the SAE's provenance
    assert len(names) == 6
    assert names[0][0] == "tree" and names[0][1] == pytest.approx(1.0, abs=1e-5)
    assert names[1][0] == "boat" and names[1][1] > 0.9
    cos = F.normalize(sae.W_dec.detach(), dim=-1) @ text.T  # the rest: the word of highest cosine, by hand
    for j in range(2, 6):
        assert names[j] == (WORDS[int(cos[j].argmax())], pytest.approx(float(cos[j].max()), abs=1e-5))
    namer = VocabularyNamer(sae, tiny_clip, WORDS)
    assert namer.name([5, 0]) == [names[5], names[0]]  # any subset, in the order asked; embeddings computed once
    with pytest.raises(ValueError, match="out of 0..5"):
        namer.name([6])


def test_vocab_refuses_what_is_not_in_the_text_space(tiny_clip):
    import torch

    from nacosae.backbones import ModuleBackbone
    from nacosae.naming.baselines import vocabulary_names

    mid = _sae_on(tiny_clip, "encoder.layers.1")
    with pytest.raises(ValueError, match="not on layer 'encoder.layers.1'.*intermediate layers"):
        vocabulary_names(mid, tiny_clip, WORDS)
    emb = _sae_on(tiny_clip, "embedding")
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        vocabulary_names(emb, tiny_clip, [])
    wide = _sae_on(tiny_clip, "encoder.layers.1")  # 32-d, claiming to be on the embedding
    with pytest.raises(ValueError, match="32-d activations but the text encoder gives 16-d"):
        vocabulary_names(wide, tiny_clip, WORDS, layer="embedding")
    cnn = ModuleBackbone(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), name="cnn")
    with pytest.raises(ValueError, match="vision-only"):
        vocabulary_names(emb, cnn, WORDS, layer="embedding")


def test_vocab_refuses_a_vision_only_clip_checkpoint(tmp_path):
    """A CLIPVisionModelWithProjection has `encode_text` (same backbone class) but no text tower: a ValueError that says
    so, not the AttributeError from inside the backbone."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from nacosae.backbones import load_backbone
    from nacosae.naming.baselines import vocabulary_names

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    vision = load_backbone(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="vision-only"):
        vocabulary_names(_sae_on(vision, "embedding"), vision, WORDS)


@pytest.mark.skipif(not OPENCLIPART_DIR.is_dir(), reason="Debian openclipart-png not installed")
def test_a_naming_run_names_features_with_vocab(tiny_clip, tmp_path):
    """The naming stage end to end (`NamingRun.name_features("vocab")`, what name_features.py runs): ~20 Open Clip Art
    images through the tiny CLIP's image embedding into a store, a random SAE on it, its statistics; every selected
    feature gets the vocabulary word nearest its decoder row. Before, the vocab method always raised."""
    import torch

    from nacosae.evaluate import NamingRun, NamingRunConfig
    from nacosae.extract import extract
    from nacosae.features import FeatureStatsConfig, compute_feature_stats
    from nacosae.images import ImageRecord, ImageSource, load_rgb
    from nacosae.naming.baselines import vocabulary_names
    from nacosae.sae import SAE, SAEConfig

    class Files(ImageSource):
        name = "openclipart"

        def __init__(self, paths):
            super().__init__()
            self.paths = paths

        def records(self):
            return [ImageRecord(image_id=f"openclipart/{p.relative_to(OPENCLIPART_DIR)}", source="openclipart", path=str(p),
                                label=p.relative_to(OPENCLIPART_DIR).parts[0], description=p.stem.replace("_", " "))
                    for p in self.paths]

        def _open(self, record):
            return load_rgb(record.path)

    paths = []
    for c in ("animals", "food", "tools"):
        paths += sorted((OPENCLIPART_DIR / c).rglob("*.png"))[:400:50]
    store = extract(Files(paths), tiny_clip, "embedding", "all", tmp_path / "acts", batch_size=12, progress=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=store.d, d_sae=8, k=2, provenance=dict(store.provenance))).init_from_data(store.sample(12))
    sae.save_pretrained(tmp_path / "sae")
    compute_feature_stats(sae, store.iter_images(12), FeatureStatsConfig(top_n=4), out_dir=tmp_path / "stats", progress=False)
    cfg = NamingRunConfig(sae=str(tmp_path / "sae"), stats=str(tmp_path / "stats"), store=str(tmp_path / "acts"),
                          n_features=3, min_fires=1, n_control=4, gemma_features=0, ms_images=8)
    run = NamingRun(cfg, tmp_path / "work", progress=False, backbone=tiny_clip, thumb_dir=tmp_path / "thumbs")
    assert run.vocab_applicable() == (True, "")
    records = run.name_features("vocab")
    assert sorted(records) == sorted(run.features) and len(records) == 3
    want = vocabulary_names(run.sae, tiny_clip, run.vocab.words, features=run.features)
    assert [records[j]["name"] for j in run.features] == [w for w, _ in want]
