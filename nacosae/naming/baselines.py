"""Baseline namers (METHODS §3.2-3.3): what the MILS loop must beat.

- `vocabulary_names`: Discover-then-Name. The vocabulary word whose unit CLIP text embedding has the highest cosine
  with the unit decoder row W_dec[j]. Valid only for SAEs trained on CLIP's final image embedding (the space the text
  encoder maps into); anything else raises.
- `top_label_names`: the most frequent label among a feature's top-N probe images.
- `random_word_names`: a seeded random vocabulary word per feature: the floor.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# nacosae.backbones names CLIP's projected image embedding (the text-aligned space) "embedding" (open_clip and HF CLIP).
EMBEDDING_LAYER = "embedding"


def check_text_aligned(backbone, layer: str, d_in: int) -> None:
    """Raise ValueError unless `layer` of `backbone` is CLIP's image embedding, where text embeddings live (METHODS §3.2).

    Checks, in order: the backbone has a text tower (`encode_text` that runs: a vision-only checkpoint of a CLIP-capable
    class has the method but no tower), the layer is `EMBEDDING_LAYER`, and the text embeddings have the SAE's width.
    """
    name = getattr(backbone, "name", type(backbone).__name__)
    vision_only = (f"vocabulary naming needs a CLIP-style backbone with a text encoder (`encode_text`); {name} is "
                   "vision-only: use the MILS loop (nacosae.naming.mils) or the top-label baseline instead")
    if not callable(getattr(backbone, "encode_text", None)):
        raise ValueError(vision_only)
    if layer != EMBEDDING_LAYER:
        raise ValueError(f"vocabulary naming compares decoder rows with CLIP text embeddings, so the SAE must sit on "
                         f"CLIP's final image embedding (layer {EMBEDDING_LAYER!r}), not on layer {layer!r}: "
                         "intermediate layers are not in the text space; use the MILS loop for them")
    try:
        probe = backbone.encode_text(["a photo"])
    except (AttributeError, FileNotFoundError) as e:  # no text tower, or no tokenizer saved with the weights
        raise ValueError(f"{vision_only} ({e})") from e
    if probe.shape[-1] != d_in:
        raise ValueError(f"the SAE reads {d_in}-d activations but the text encoder gives {probe.shape[-1]}-d embeddings: "
                         "this SAE is not on this CLIP's image embedding")


class VocabularyNamer:
    """Discover-then-Name (METHODS §3.2) for one SAE: the vocabulary's unit text embeddings (computed once, by the
    backbone's text tower) against the unit decoder rows W_dec[j].

        namer = VocabularyNamer(sae, load_backbone("hf:openai/clip-vit-base-patch32"), load_vocabulary().words)
        namer.name([3, 17])      # [(word, cosine), (word, cosine)]

    The decoder rows live in the SAE's scaled input space, a positive multiple of the layer's: the direction, and so
    the cosine, is the same. The bias b_dec is not part of any feature's direction and is left out.

    sae: an `nacosae.sae.SAE` on CLIP's image embedding; backbone: a CLIP backbone (`encode_text(texts)` → (N, E) unit
    rows); words: the vocabulary (ties go to the first word); layer: the SAE's layer (default: its provenance);
    template: how a word becomes a text (default: the word itself), e.g. "a photo of {}".
    Raises ValueError for an empty vocabulary, an unknown layer, a vision-only backbone, a layer other than the image
    embedding, or a width that is not the text embedding's (`check_text_aligned`).
    """

    def __init__(self, sae, backbone, words: Sequence[str], layer: str | None = None, template: str = "{}",
                 batch_size: int = 256):
        if not words:
            raise ValueError("vocabulary naming needs a non-empty vocabulary (see nacosae.naming.vocab.load_vocabulary)")
        layer = layer if layer is not None else sae.cfg.provenance.get("layer")
        if layer is None:
            raise ValueError("the SAE's provenance has no 'layer': pass layer= (the backbone layer the SAE was trained on)")
        check_text_aligned(backbone, layer, sae.cfg.d_in)
        self.sae, self.words = sae, list(words)
        texts = [template.format(w) for w in self.words]
        with torch.no_grad():
            text_VE = torch.cat([backbone.encode_text(texts[i: i + batch_size]).float().cpu()
                                 for i in range(0, len(texts), batch_size)])
        self.text_VE = F.normalize(text_VE, dim=-1)
        """(V, E) unit text embeddings, row v = words[v]."""

    @torch.no_grad()
    def name(self, features: Sequence[int] | None = None) -> list[tuple[str, float]]:
        """(word, cosine) for each feature in `features` (default: all d_sae), in that order."""
        d_sae = self.sae.cfg.d_sae
        feats = list(range(d_sae)) if features is None else [int(j) for j in features]
        bad = [j for j in feats if not 0 <= j < d_sae]
        if bad:
            raise ValueError(f"features {bad[:5]} are out of 0..{d_sae - 1}")
        dec_FE = F.normalize(self.sae.W_dec.detach().float().cpu()[feats], dim=-1)
        cos_FV = dec_FE @ self.text_VE.T
        best_F = cos_FV.argmax(dim=1)  # ties: the first word in vocabulary order
        return [(self.words[int(v)], float(cos_FV[f, v])) for f, v in enumerate(best_F)]


def vocabulary_names(sae, backbone, words: Sequence[str], layer: str | None = None, features: Sequence[int] | None = None,
                     batch_size: int = 256, template: str = "{}") -> list[tuple[str, float]]:
    """(word, cosine) per feature: the word whose unit text embedding is nearest the unit decoder row (no bias).
    One-shot form of `VocabularyNamer` (which keeps the text embeddings for later calls); same arguments and errors."""
    return VocabularyNamer(sae, backbone, words, layer=layer, template=template, batch_size=batch_size).name(features)


def top_label_names(top_labels: Sequence[Sequence[str]]) -> list[str | None]:
    """The majority label of each feature's top images (ordered best first); ties go to the label seen first, i.e.
    of the higher-ranked image. None for a feature without top images."""
    out = []
    for labels in top_labels:
        counts = Counter(labels)
        if not counts:
            out.append(None)
            continue
        first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
        out.append(max(counts, key=lambda lab: (counts[lab], -first[lab])))
    return out


def random_word_names(words: Sequence[str], n_features: int, seed: int = 0) -> list[str]:
    """One uniformly drawn vocabulary word per feature (with replacement), reproducible from `seed`."""
    if not words:
        raise ValueError("random_word_names needs a non-empty vocabulary")
    rng = random.Random(seed)
    return [rng.choice(list(words)) for _ in range(n_features)]
