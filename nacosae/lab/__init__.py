"""The small-network lab: look inside a small classifier, find units that react to an unwanted pattern, switch them off,
and use what was found as a training signal (docs/lab.md).

Modules, one step each:
    data.py        Fashion-MNIST from the Debian package + planting a spurious cue
    models.py      small CNN / MLP / ViT used by the lab
    structure.py   layer graph (torch.fx, hook fallback) with shapes and parameter counts; SVG/HTML and PNG drawings
    probe.py       per-unit activations, statistics, top inputs, histograms, attribution, monosemanticity
    cue.py         automatic search for units / SAE features that detect a cue
    intervene.py   ablate / clamp / steer units and SAE features, and measure the effect
    regularize.py  the training experiment (baseline vs L2+dropout vs interpretability-guided methods)
"""
