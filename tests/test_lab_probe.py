"""Unit activations, statistics and attribution on tiny models whose answers are known in closed form."""

import pytest
import torch
from torch import nn

from nacosae.lab.models import ModelConfig, build_model
from nacosae.lab.probe import (
    histogram,
    integrated_gradients,
    layer_statistic,
    monosemanticity,
    record_activations,
    reduce_units,
    top_inputs,
    unit_attribution,
    unit_statistics,
)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.flatten(x))


class Smooth(nn.Module):
    """conv → tanh → flatten → linear: smooth, so integrated gradients converge quickly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.flatten(self.act(self.conv(x))))


def test_ig_of_a_linear_model_is_input_times_weight():
    torch.manual_seed(0)
    m = Linear()
    x = torch.randn(2, 1, 3, 4)
    ig = integrated_gradients(m, x, target=1, n_steps=3)
    assert torch.allclose(ig.flatten(1), x.flatten(1) * m.fc.weight[1], atol=1e-6)


def test_ig_completeness_on_a_nonlinear_model():
    torch.manual_seed(0)
    m = Smooth()
    x = torch.randn(3, 1, 4, 4)
    base = torch.full_like(x, 0.1)
    ig = integrated_gradients(m, x, target=torch.tensor([0, 1, 0]), baseline=base, n_steps=200)
    with torch.no_grad():
        fx, fb = m(x), m(base)
    want = torch.stack([fx[0, 0] - fb[0, 0], fx[1, 1] - fb[1, 1], fx[2, 0] - fb[2, 0]])
    assert torch.allclose(ig.flatten(1).sum(1), want, atol=2e-3)


def test_grad_x_act_before_a_linear_readout_decomposes_the_logit():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=16))
    x = torch.rand(5, 1, 28, 28)
    attr = unit_attribution(m, x, ["act3"], target=2)["act3"]
    with torch.no_grad():
        logits = m(x)
    # logit_2 = W[2] · act3 + b[2], and grad × act sums W[2]_u · a_u exactly
    assert attr.shape == (5, 16)
    assert torch.allclose(attr.sum(1), logits[:, 2] - m.fc2.bias[2], atol=1e-5)


def test_layer_ig_completeness_at_a_conv_layer():
    torch.manual_seed(0)
    m = Smooth()
    x = torch.randn(2, 1, 4, 4)
    attr = unit_attribution(m, x, ["act"], target=0, method="ig", n_steps=100)["act"]  # (2, 3) channels
    with torch.no_grad():
        full = m(x)[:, 0]
        zero_at_layer = m.fc.bias[0]  # act output scaled to 0: only the readout bias is left
    assert attr.shape == (2, 3)
    assert torch.allclose(attr.sum(1), full - zero_at_layer, atol=1e-4)  # F is linear in act: exact up to fp


def test_predicted_class_is_the_default_target():
    torch.manual_seed(0)
    m = Linear()
    x = torch.randn(4, 1, 3, 4)
    pred = m(x).argmax(-1)
    assert torch.allclose(integrated_gradients(m, x), integrated_gradients(m, x, target=pred))


def test_record_and_reduce():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=8))
    x = torch.rand(7, 1, 28, 28)
    acts, logits = record_activations(m, x, ["act1", "act3"], reduce="max", batch_size=3)
    assert acts["act1"].shape == (7, 4) and acts["act3"].shape == (7, 8) and logits.shape == (7, 10)
    full, _ = record_activations(m, x, ["act1"], reduce="none")
    assert full["act1"].shape == (7, 4, 28, 28)
    assert torch.allclose(acts["act1"], full["act1"].amax((2, 3)))
    assert torch.allclose(reduce_units(full["act1"], "mean"), full["act1"].mean((2, 3)))
    with pytest.raises(KeyError, match="hookable"):
        record_activations(m, x, ["nope"])


def test_statistics_top_inputs_and_histogram():
    a = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    s = unit_statistics(a)
    assert s["dead"].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(s["firing_rate"], torch.tensor([0.0, 2 / 3, 1.0]))
    idx, vals = top_inputs(a, 2, k=2)
    assert idx.tolist() == [0, 1] and vals.tolist() == [3.0, 3.0]  # tie broken by the lower index
    counts, edges = histogram(a[:, 1], bins=4, nonzero=True)
    assert counts.sum() == 2 and len(edges) == 5


def test_layer_statistic_dead_and_monosemanticity():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=8))
    with torch.no_grad():
        m.fc1.bias[3] = -1e4  # unit 3 of act3 can never fire
    x = torch.rand(20, 1, 28, 28)
    dead = layer_statistic(m, "dead", ["act3"], probe_x=x)["act3"]
    assert dead[3] == 1.0
    ms = layer_statistic(m, "monosemanticity", ["act3"], probe_x=x, emb_NE=torch.randn(20, 5))["act3"]
    assert torch.isnan(ms[3]) and ms.shape == (8,)
    attr = layer_statistic(m, "attribution", ["act3"], x_one=x[:1])["act3"]
    assert attr.shape == (8,) and attr[3] == 0
    with pytest.raises(ValueError, match="x_one"):
        layer_statistic(m, "attribution", ["act3"])


def test_monosemanticity_of_a_unit_firing_on_one_kind_of_image():
    emb = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(5, 1)])
    acts = torch.zeros(10, 2)
    acts[:5, 0] = 1.0  # unit 0: only the first kind
    acts[:, 1] = 1.0
    acts[0, 1] = 0.0  # unit 1: every image (but not constant)
    ms = monosemanticity(acts, emb)
    assert ms[0] == pytest.approx(1.0) and ms[1] < 0.5
