"""Naming SAE features (METHODS §3): the MILS-style loop and its parts, and the baseline namers.

Parts behind small protocols, each swappable:
    proposers  (LLM or vocabulary)   propose(best, n, context) -> prompts; summarise(best) -> name
    generators (text → images)       render(prompt, seeds) -> [Render(image, ref)]
    scorer     (backbone + SAE)      score(images, features) -> (n_images, n_features)
Heavy imports (transformers, diffusers, sentence-transformers) happen inside the classes that need them.
"""

from nacosae.naming.baselines import random_word_names, top_label_names, vocabulary_names
from nacosae.naming.generators import (
    DescribedImageBank,
    DiffusersGenerator,
    Render,
    RenderCache,
    RetrievalGenerator,
    TextEmbedder,
)
from nacosae.naming.mils import MILSConfig, MILSState, new_state, run_mils, seed_prompts
from nacosae.naming.proposers import (
    FewShotLMProposer,
    GGUFProposer,
    ProposalContext,
    ScriptedProposer,
    TransformersChatProposer,
    VocabularyProposer,
    clean_name,
    parse_numbered_lines,
)
from nacosae.naming.scorer import FeatureScorer
from nacosae.naming.vocab import ConceptVocabulary, load_vocabulary

__all__ = [
    "ConceptVocabulary", "DescribedImageBank", "DiffusersGenerator", "FeatureScorer", "FewShotLMProposer", "GGUFProposer",
    "MILSConfig", "MILSState", "ProposalContext", "Render", "RenderCache", "RetrievalGenerator", "ScriptedProposer",
    "TextEmbedder", "TransformersChatProposer", "VocabularyProposer", "clean_name", "load_vocabulary", "new_state",
    "parse_numbered_lines", "random_word_names", "run_mils", "seed_prompts", "top_label_names", "vocabulary_names",
]
