"""FeatureScorer with a real (tiny) backbone and a hand-set SAE, its agreement with the feature statistics, the loop
wired to it, and the baseline namers (Discover-then-Name with a tiny random open_clip CLIP)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nacosae.backbones import load_backbone
from nacosae.features import FeatureStatsConfig, backbone_blocks, compute_feature_stats
from nacosae.naming.baselines import random_word_names, top_label_names, vocabulary_names
from nacosae.naming.generators import Render
from nacosae.naming.mils import MILSConfig, new_state, run_mils
from nacosae.naming.proposers import ScriptedProposer
from nacosae.naming.scorer import FeatureScorer
from nacosae.sae import SAE, SAEConfig

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "orange": (255, 128, 0)}


def _pixels_8x8(img):
    arr = np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.NEAREST))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def colour_backbone():
    """A 1×1 convolution that passes RGB through: 64 spatial tokens of d=3 per image (a real ModuleBackbone)."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        conv.bias.zero_()
    return load_backbone("module", model=nn.Sequential(conv), preprocess=_pixels_8x8, name="rgb-identity")


@pytest.fixture(scope="module")
def colour_sae():
    """Features 0/1/2 fire on red/green/blue pixels (1 for a pure colour), feature 3 never fires."""
    sae = SAE(SAEConfig(d_in=3, d_sae=4, activation="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [-1, -1, -1]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def solid(name):
    return Image.new("RGB", (16, 16), COLOURS[name])


def half(name):  # left half coloured, right half white
    im = Image.new("RGB", (16, 16), COLOURS["white"])
    im.paste(solid(name).crop((0, 0, 8, 16)), (0, 0))
    return im


def test_image_level_activation_per_aggregation(colour_backbone, colour_sae):
    imgs = [solid("red"), half("red"), solid("blue"), solid("orange")]
    raw = FeatureScorer(colour_backbone, "0", "spatial", colour_sae, aggregation="max").score(imgs, [0, 2])
    assert raw.shape == (4, 2)
    assert torch.allclose(raw[:, 0], torch.tensor([1.0, 1.0, 0.0, 1 - 128 / 255]), atol=1e-5)  # max over tokens
    assert torch.allclose(raw[:, 1], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    mean = FeatureScorer(colour_backbone, "0", "spatial", colour_sae, aggregation="mean").score(imgs, [0])
    assert torch.allclose(mean[:, 0], torch.tensor([1.0, 0.5, 0.0, 1 - 128 / 255]), atol=1e-5)
    # normalised by the probe maxima (METHODS §3.1 step 4), features in the order asked
    norm = FeatureScorer(colour_backbone, "0", "spatial", colour_sae, max_act_S=torch.tensor([2.0, 1, 4, 1]), batch_size=3)
    assert torch.allclose(norm.score(imgs, [2, 0]), torch.stack([raw[:, 1] / 4, raw[:, 0] / 2], 1))


def test_scores_agree_with_the_feature_statistics(colour_backbone, colour_sae):
    """The scorer's activation is the statistics pass's image-level activation: on the probe set, the best image of a
    feature scores exactly 1."""
    probe = [half("red"), solid("green"), solid("orange"), half("blue"), solid("red")]
    stats = compute_feature_stats(colour_sae, backbone_blocks(colour_backbone, probe, "0", "spatial", batch_images=2),
                                  FeatureStatsConfig(top_n=2), progress=False)
    scorer = FeatureScorer.from_stats(colour_backbone, "0", "spatial", colour_sae, stats)
    s = scorer.score(probe, [0, 1, 2])
    assert torch.allclose(s.max(0).values, torch.ones(3)) and (s >= 0).all() and (s <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="never fired"):
        scorer.score(probe, [3])


def test_bad_arguments(colour_backbone, colour_sae):
    with pytest.raises(ValueError, match="aggregation"):
        FeatureScorer(colour_backbone, "0", "spatial", colour_sae, aggregation="median")
    with pytest.raises(ValueError, match="d_sae=4"):
        FeatureScorer(colour_backbone, "0", "spatial", colour_sae, max_act_S=torch.ones(5))
    with pytest.raises(ValueError, match="features must be in"):
        FeatureScorer(colour_backbone, "0", "spatial", colour_sae).score([solid("red")], [4])


class ColourWords:
    """A tiny text-to-image model: a prompt's first colour word, painted over the left `cover` of a white canvas
    (the seed sets the cover), so renders differ per seed but depend on the prompt's meaning."""

    id = "colour-words"

    def render(self, prompt, seeds):
        colour = next((w for w in prompt.split() if w in COLOURS), "white")
        out = []
        for s in seeds:
            im = Image.new("RGB", (16, 16), COLOURS["white"])
            im.paste(Image.new("RGB", (4 + 4 * (s % 3), 16), COLOURS[colour]), (0, 0))
            out.append(Render(im, f"{colour}:{s}"))
        return out


def test_loop_with_the_real_scorer(colour_backbone, colour_sae):
    scorer = FeatureScorer(colour_backbone, "0", "spatial", colour_sae, aggregation="mean",
                           max_act_S=torch.tensor([0.5, 1, 1, 1]))
    script = [["a white cat", "a green leaf", "an orange fruit"], ["a red car", "a blue sea", "a red apple"]]
    state = run_mils(new_state(0, ["a white dog"]), ScriptedProposer(script), ColourWords(), scorer,
                     MILSConfig(n_iterations=2, n_candidates=3, n_best=2, n_images=3), progress=False)
    scores = {c.prompt: c.score for c in state.candidates}
    # mean over tokens of the red cover (4, 8, 12 of 16 columns) = 0.5 on average, / probe max 0.5 = 1.0
    assert scores["a red car"] == pytest.approx(1.0) and scores["a white cat"] == 0.0
    assert 0 < scores["an orange fruit"] < 0.5
    assert state.best == [(pytest.approx(1.0), "a red car"), (pytest.approx(1.0), "a red apple")] and state.name == "a red car"
    json.dumps(state.to_dict())  # everything the loop stored is plain JSON


# ------------------------------------------------------------------------------------------------ baselines


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    torch.manual_seed(0)
    return load_backbone(f"open_clip:local-dir:{folder}")


WORDS = ["dog", "cat", "car", "tree", "boat", "stop sign"]


def test_vocabulary_naming_finds_the_word_of_each_decoder_row(tiny_clip):
    text_VE = tiny_clip.encode_text(WORDS)
    order = [3, 0, 5, 1]
    sae = SAE(SAEConfig(d_in=16, d_sae=4, k=2, provenance={"layer": "embedding"}))
    with torch.no_grad():  # decoder rows = (scaled, slightly noisy) text embeddings of known words
        sae.W_dec.copy_(3.0 * text_VE[order] + 0.01 * torch.randn(4, 16))
    names = vocabulary_names(sae, tiny_clip, WORDS)
    assert [w for w, _ in names] == [WORDS[i] for i in order] and all(c > 0.99 for _, c in names)
    assert [w for w, _ in vocabulary_names(sae, tiny_clip, WORDS, features=[2, 0], batch_size=4)] == ["stop sign", "tree"]


def test_vocabulary_naming_refuses_other_layers(tiny_clip, colour_backbone):
    sae = SAE(SAEConfig(d_in=32, d_sae=4, k=2, provenance={"layer": "resblocks.0"}))
    with pytest.raises(ValueError, match="intermediate layers"):
        vocabulary_names(sae, tiny_clip, WORDS)
    with pytest.raises(ValueError, match="vision-only"):
        vocabulary_names(SAE(SAEConfig(d_in=3, d_sae=4, k=2)), colour_backbone, WORDS, layer="0")
    with pytest.raises(ValueError, match="32-d activations"):
        vocabulary_names(SAE(SAEConfig(d_in=32, d_sae=4, k=2)), tiny_clip, WORDS, layer="embedding")
    with pytest.raises(ValueError, match="provenance"):
        vocabulary_names(SAE(SAEConfig(d_in=16, d_sae=4, k=2)), tiny_clip, WORDS)


def test_top_label_and_random_word_baselines():
    assert top_label_names([["cat", "dog", "dog", "cat", "bird"], ["car"], [], ["b", "a", "a", "b"]]) == ["cat", "car", None, "b"]
    words = ["a", "b", "c", "d"]
    r = random_word_names(words, 50, seed=3)
    assert r == random_word_names(words, 50, seed=3) != random_word_names(words, 50, seed=4)
    assert set(r) == set(words)
    with pytest.raises(ValueError, match="non-empty"):
        random_word_names([], 3)
