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
    """Raise unless `layer` of `backbone` is CLIP's image embedding, where text embeddings live (METHODS §3.2)."""
    if not callable(getattr(backbone, "encode_text", None)):
        raise ValueError(f"vocabulary naming needs a CLIP-style backbone with a text encoder (`encode_text`); "
                         f"{getattr(backbone, 'name', type(backbone).__name__)} is vision-only: use the MILS loop "
                         "(nacosae.naming.mils) or the top-label baseline instead")
    if layer != EMBEDDING_LAYER:
        raise ValueError(f"vocabulary naming compares decoder rows with CLIP text embeddings, so the SAE must sit on "
                         f"CLIP's final image embedding (layer {EMBEDDING_LAYER!r}), not on layer {layer!r}: "
                         "intermediate layers are not in the text space; use the MILS loop for them")
    probe = backbone.encode_text(["a photo"])
    if probe.shape[-1] != d_in:
        raise ValueError(f"the SAE reads {d_in}-d activations but the text encoder gives {probe.shape[-1]}-d embeddings: "
                         "this SAE is not on this CLIP's image embedding")


@torch.no_grad()
def vocabulary_names(sae, backbone, words: Sequence[str], layer: str | None = None, features: Sequence[int] | None = None,
                     batch_size: int = 256) -> list[tuple[str, float]]:
    """(word, cosine) per feature: the word whose unit text embedding is nearest the unit decoder row (no bias).

    layer: the SAE's layer (default: `sae.cfg.provenance["layer"]`).
    """
    if not words:
        raise ValueError("vocabulary_names needs a non-empty vocabulary (see nacosae.naming.vocab.load_vocabulary)")
    layer = layer if layer is not None else sae.cfg.provenance.get("layer")
    if layer is None:
        raise ValueError("the SAE's provenance has no 'layer': pass layer= (the backbone layer the SAE was trained on)")
    check_text_aligned(backbone, layer, sae.cfg.d_in)
    text_VE = torch.cat([backbone.encode_text(list(words[i: i + batch_size])).float().cpu()
                         for i in range(0, len(words), batch_size)])
    text_VE = F.normalize(text_VE, dim=-1)
    feats = list(range(sae.cfg.d_sae)) if features is None else list(features)
    dec_FE = F.normalize(sae.W_dec.detach().float().cpu()[feats], dim=-1)
    cos_FV = dec_FE @ text_VE.T
    best_F = cos_FV.argmax(dim=1)  # ties: the first word in vocabulary order
    return [(words[int(v)], float(cos_FV[f, v])) for f, v in enumerate(best_F)]


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
