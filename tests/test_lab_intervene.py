"""Ablate / clamp / steer: each edit does exactly what METHODS §5 says, on tiny models."""

import pytest
import torch
from torch import nn

from nacosae.lab.intervene import clamp_sites, clamp_units, evaluate, hooked, run_with_edits, sae_clamp, sae_steer, zero_units
from nacosae.lab.models import ModelConfig, build_model
from nacosae.sae import SAE, SAEConfig


class Readout(nn.Module):
    """x → hidden (4 units, identity 'layer') → logits; logit 0 reads only unit 0."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Identity()
        self.out = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.out.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 1.0]]))

    def forward(self, x_B4):
        return self.out(self.hidden(x_B4))


def _sae(d_in=4, d_sae=6, k=2, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    sae.init_from_data(torch.randn(64, d_in) * 3)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3)
    return sae.eval()


def test_zero_and_clamp_units_touch_only_those_units():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=8))
    x = torch.rand(3, 1, 28, 28)
    with hooked(m, {}, record=["act2", "act3"]) as plain:
        m(x)
    with hooked(m, {"act2": zero_units([1, 3]), "act3": clamp_units([0, 5], [2.0, -1.0])}, record=["act2", "act3"]) as rec:
        m(x)
    assert (rec["act2"][:, [1, 3]] == 0).all()
    assert torch.equal(rec["act2"][:, [0, 2]], plain["act2"][:, [0, 2]])
    assert (rec["act3"][:, 0] == 2.0).all() and (rec["act3"][:, 5] == -1.0).all()
    with pytest.raises(IndexError, match="out of range"):
        run_with_edits(m, x, {"act2": zero_units([99])})


def test_hooks_are_removed_after_the_block():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="mlp", width=4, hidden=8))
    x = torch.rand(2, 1, 28, 28)
    before = m(x)
    with hooked(m, {"act2": zero_units(range(8))}):
        edited = m(x)
    assert torch.allclose(m(x), before)
    assert torch.allclose(edited, m.fc3.bias.expand_as(edited))  # all hidden units off: only the bias is left


def test_ablating_a_unit_that_feeds_nothing_changes_nothing():
    m = Readout()
    x = torch.randn(5, 4)
    assert torch.equal(run_with_edits(m, x, {"hidden": zero_units([1])})[:, 0], m(x)[:, 0])
    assert torch.equal(run_with_edits(m, x, {"hidden": zero_units([0])})[:, 0], torch.zeros(5))


def test_clamp_sites_uses_channel_major_flat_indices():
    a = torch.zeros(2, 3, 4, 5)
    flat = [1 * 20 + 2 * 5 + 3]  # channel 1, row 2, col 3
    out = clamp_sites(flat, 7.0)(a)
    assert out[:, 1, 2, 3].eq(7.0).all() and out.sum() == 2 * 7.0


def test_sae_clamp_to_the_current_value_is_the_identity():
    sae = _sae()
    h = torch.randn(10, 4) * 3
    codes = sae.encode(h).detach()
    j = int(codes.abs().sum(0).argmax())  # a feature that fires somewhere
    # clamp j to its own value, row by row: h' = decode(f) + (h − decode(f)) = h
    for i in range(10):
        out = sae_clamp(sae, [j], float(codes[i, j]))(h[i : i + 1])
        assert torch.allclose(out, h[i : i + 1], atol=1e-5)
    assert torch.allclose(sae_clamp(sae, [], 0.0)(h), h, atol=1e-5)


def test_sae_ablation_removes_exactly_the_feature_contribution():
    sae = _sae()
    h = torch.randn(10, 4) * 3
    codes = sae.encode(h).detach()
    j = int(codes.abs().sum(0).argmax())
    out = sae_clamp(sae, [j], 0.0)(h)
    want = h - codes[:, j : j + 1] * sae.W_dec[j] * sae.cfg.input_scale
    assert torch.allclose(out, want, atol=1e-5)


def test_sae_clamp_on_a_conv_map_reads_channel_vectors():
    sae = _sae(d_in=3)
    a = torch.randn(2, 3, 4, 5) * 3
    tokens = a.permute(0, 2, 3, 1)
    codes = sae.encode(tokens).detach()
    out = sae_clamp(sae, [0, 1, 2, 3, 4, 5], 0.0)(a)  # every feature off: only the error and b_dec remain
    err = tokens - sae.decode(codes)
    want = (err + sae.b_dec * sae.cfg.input_scale).permute(0, 3, 1, 2)
    assert torch.allclose(out, want, atol=1e-5)


def test_steering_moves_logits_along_the_decoder_row():
    m = Readout()
    sae = _sae()
    x = torch.randn(5, 4)
    assert torch.allclose(run_with_edits(m, x, {"hidden": sae_steer(sae, 2, 0.0)}), m(x))
    alpha = 3.0
    got = run_with_edits(m, x, {"hidden": sae_steer(sae, 2, alpha)}) - m(x)
    want = alpha * sae.cfg.input_scale * (m.out.weight @ sae.W_dec[2].detach())
    assert torch.allclose(got, want.expand_as(got), atol=1e-5)


def test_steering_at_positions_only_changes_those_positions():
    sae = _sae(d_in=3)
    a = torch.randn(2, 3, 4, 5)
    where = torch.zeros(4, 5, dtype=torch.bool)
    where[0, 0] = True
    out = sae_steer(sae, 1, 5.0, where)(a)
    diff = (out - a).abs().sum(1)  # (2, 4, 5)
    assert diff[:, 0, 0].gt(0).all() and diff.flatten(1)[:, 1:].eq(0).all()
    with pytest.raises(ValueError, match="positions_HW"):
        sae_steer(sae, 1, 5.0, torch.ones(3, 3, dtype=torch.bool))(a)


def test_evaluate_confusion_and_accuracy():
    m = Readout()
    x = torch.tensor([[1.0, 0.1, 0, 0], [0, 1.0, 0, 0], [2.0, 0, 0.5, 0], [0, 0, 0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    r = evaluate(m, x, y, n_classes=2)
    assert r.pred.tolist() == [0, 1, 0, 1]
    assert r.accuracy == 0.75 and r.confusion.tolist() == [[1, 0], [1, 2]]
    assert r.recall().tolist() == [1.0, pytest.approx(2 / 3)]
    assert r.predicted_rate(0, y == 1) == pytest.approx(1 / 3)
    r2 = evaluate(m, x, y, {"hidden": zero_units([0])}, n_classes=2)
    assert r2.pred.tolist() == [1, 1, 1, 1]  # logit 0 reads only unit 0: with it ablated, class 1 wins everywhere


def test_sae_site_clamp_and_steer_touch_one_feature_at_one_position():
    from nacosae.lab.intervene import sae_clamp_sites, sae_steer_sites

    sae = _sae(d_in=3, d_sae=6, k=2)
    a = torch.randn(2, 3, 4, 5) * 3
    tokens = a.permute(0, 2, 3, 1)
    codes = sae.encode(tokens).detach()  # (2, 4, 5, 6)
    b, r, c = 0, 2, 3
    j = int(codes[b, r, c].argmax())
    flat = j * 20 + r * 5 + c
    out = sae_clamp_sites(sae, [flat], 0.0)(a)
    diff = (out - a).permute(0, 2, 3, 1)  # (2, 4, 5, 3)
    want = -codes[..., j, None] * sae.W_dec[j].detach() * sae.cfg.input_scale
    assert torch.allclose(diff[:, r, c], want[:, r, c], atol=1e-5)
    diff[:, r, c] = 0
    assert diff.abs().max() < 1e-5  # every other position untouched
    pushed = sae_steer_sites(sae, [flat], 2.0)(a) - a
    assert torch.allclose(pushed[:, :, r, c], (2.0 * sae.W_dec[j] * sae.cfg.input_scale).detach().expand(2, 3), atol=1e-5)
    pushed[:, :, r, c] = 0
    assert pushed.abs().max() == 0
    with pytest.raises(IndexError, match="out of range"):
        sae_clamp_sites(sae, [6 * 20], 0.0)(a)
