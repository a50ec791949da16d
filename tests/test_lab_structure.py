"""Tracing any small model into a layer graph, and drawing it."""

import re

import pytest
import torch
from torch import nn

from nacosae.lab.models import ModelConfig, build_model
from nacosae.lab.structure import LayerGraph, LayerNode, render_html, render_png, render_svg, trace_model

X = torch.zeros(1, 1, 28, 28)


def test_cnn_graph_has_shapes_params_and_chain_edges():
    model = build_model(ModelConfig(kind="cnn", width=8, hidden=64))
    g = trace_model(model, X)
    assert g.traced_with == "fx"
    names = [n.name for n in g.nodes]
    assert names[1:] == ["conv1", "act1", "pool1", "conv2", "act2", "pool2", "flatten", "fc1", "act3", "drop", "fc2", "output"]
    assert g.node("conv1").out_shape == (8, 28, 28) and g.node("conv1").n_params == 8 * 9 + 8
    assert g.node("act2").out_shape == (16, 14, 14) and g.node("act2").n_units == 16
    assert g.node("act3").n_units == 64 and g.node("fc1").n_params == 16 * 7 * 7 * 64 + 64
    assert g.n_params == sum(p.numel() for p in model.parameters())
    assert ("act2", "pool2") in g.edges and len(g.edges) == len(g.nodes) - 1


def test_vit_graph_keeps_residual_adds_and_attention_shape():
    g = trace_model(build_model(ModelConfig(kind="vit", width=32)), X)
    adds = [n for n in g.nodes if n.kind == "add"]
    assert len(adds) == 5  # + pos, then two residual adds per block
    assert all(len(n.inputs) == 2 for n in adds)
    attn = g.node("blocks.0.attn")
    assert attn.out_shape == (17, 32) and attn.n_params == 4 * 32 * 32 + 4 * 32
    assert g.node("pos").op == "param" and g.node("pos").out_shape == (1, 17, 32)
    # getitem on the attention tuple is collapsed: the add reads the attention module directly
    assert "blocks.0.attn" in g.node(adds[1].name).inputs


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = -h
        return self.b(h)


def test_untraceable_model_falls_back_to_hooks():
    m = Branchy()
    with pytest.raises(ValueError, match="method='hooks'"):
        trace_model(m, torch.ones(1, 4), method="fx")
    g = trace_model(m, torch.ones(1, 4))
    assert g.traced_with == "hooks"
    assert [n.name for n in g.nodes] == ["x", "a", "b", "output"]
    assert g.node("a").out_shape == (3,) and g.node("b").n_params == 8
    assert g.edges == [("x", "a"), ("a", "b"), ("b", "output")]


def test_graph_round_trips_and_validates():
    g = trace_model(build_model(ModelConfig(kind="mlp", width=4)), X)
    assert LayerGraph.from_dict(g.to_dict()) == g
    n = LayerNode("a", "module", "Linear", (3,), 4, 3, ())
    with pytest.raises(ValueError, match="duplicate"):
        LayerGraph("m", (n, n), "fx", 4)
    with pytest.raises(ValueError, match="topologically"):
        LayerGraph("m", (LayerNode("b", "module", "ReLU", (3,), 0, 3, ("a",)), n), "fx", 4)


def test_svg_draws_one_cell_per_unit_with_tooltips():
    model = build_model(ModelConfig(kind="cnn", width=8))
    g = trace_model(model, X)
    stats = {"act2": torch.arange(16.0), "act3": torch.linspace(-1, 1, 64), g.nodes[0].name: torch.rand(28, 28)}
    svg = render_svg(g, stats, "my stat")
    assert len(re.findall(r'data-node="act2" data-unit="\d+"', svg)) == 16
    assert len(re.findall(r'data-node="act3" data-unit="\d+"', svg)) == 64
    assert len(re.findall(rf'data-node="{g.nodes[0].name}" data-unit="\d+"', svg)) == 28 * 28
    assert "act2 · unit 15 · my stat 15" in svg
    assert svg.count('class="node"') == len(g.nodes)
    html = render_html(g, stats, "my stat", title="t")
    assert html.startswith("<!doctype html>") and "fc1" in html
    with pytest.raises(KeyError, match="not in the graph"):
        render_svg(g, {"nope": torch.ones(3)})


def test_png_is_written(tmp_path):
    g = trace_model(build_model(ModelConfig(kind="vit", width=16)), X)
    render_png(g, {"act": torch.rand(64)}, tmp_path / "s.png", "rand", hide=("param",))
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
