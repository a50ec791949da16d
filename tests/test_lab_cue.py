"""Cue planting (real Fashion-MNIST files) and the automatic cue-detector search (hand-built detectors)."""

import pytest
import torch
from torch import nn

from nacosae.lab.cue import cue_scores, find_cue_features, find_cue_units, paired_probe, select_detectors
from nacosae.lab.data import DEFAULT_ROOT, CueDataConfig, CueSpec, apply_cue, load_fashion_mnist, make_cue_data, remove_cue
from nacosae.sae import SAE, SAEConfig

CUE = CueSpec(size=3, row=1, col=1)
CONTROL = CueSpec(size=3, row=24, col=24)
needs_data = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
)


class Probes(nn.Module):
    """Three hand-made 'units' (as a (B, 3) layer called `units`):
    0 = mean of the cue's square (a cue detector), 1 = mean of the image centre (content),
    2 = mean of both corners (reacts to the cue *and* to the control mark: not specific)."""

    def __init__(self):
        super().__init__()
        self.units = nn.Identity()

    def forward(self, x):
        x = x[:, 0]
        u0 = x[:, 1:4, 1:4].mean((1, 2))
        u1 = x[:, 10:18, 10:18].mean((1, 2))
        u2 = (x[:, 1:4, 1:4].mean((1, 2)) + x[:, 24:27, 24:27].mean((1, 2))) / 2
        return self.units(torch.stack([u0, u1, u2], 1))


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 6:22] = torch.rand(n, 1, 16, 16, generator=g)  # 'garments' in the middle, empty corners
    return x


def test_apply_and_remove_cue():
    x = torch.rand(4, 1, 28, 28)
    where = torch.tensor([True, False, True, False])
    y = apply_cue(x, CUE, where)
    assert (y[where][:, :, 1:4, 1:4] == 1.0).all()
    assert torch.equal(y[~where], x[~where]) and torch.equal(x, x.clone())  # input untouched
    z = remove_cue(y, CUE)
    assert (z[:, :, 1:4, 1:4] == 0).all()
    on, off = paired_probe(x, CUE)
    assert torch.equal((on != off).any(1).any(0), CUE.mask())  # the pair differs only on the mark
    with pytest.raises(ValueError, match="does not fit"):
        CueSpec(size=5, row=25)


def test_detector_search_finds_the_cue_unit_and_rejects_the_unspecific_one():
    found, scores = find_cue_units(Probes(), _images(), CUE, ["units"], reduce="max", min_effect=1.0, min_auc=0.9)
    assert sorted(u.unit for u in found) == [0, 2]  # both read the mark...
    assert scores["units"]["auc"][0] == 1.0 and scores["units"]["gap"][1] == 0
    found, scores = find_cue_units(Probes(), _images(), CUE, ["units"], control=CONTROL)
    assert [u.unit for u in found] == [0]  # ...but unit 2 also reads the control mark
    assert found[0].control_effect == 0 and found[0].gap == pytest.approx(1.0)
    assert scores["units"]["control_effect"][2] > 0.5 * scores["units"]["effect"][2]


def test_site_search_locates_the_mark():
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # channel 0 copies the image: fires where the mark is
    model = nn.Sequential()
    model.add_module("conv", conv)
    found, scores = find_cue_units(model, _images(), CUE, ["conv"], reduce="none", control=CONTROL)
    assert scores["conv"]["shape"].tolist() == [2, 28, 28]
    assert {u.unit for u in found} == {0}
    assert {u.position for u in found} == {(r, c) for r in range(1, 4) for c in range(1, 4)}
    assert all(u.flat == r * 28 + c for u in found for (r, c) in [u.position])
    assert found[0].label.startswith("conv[0]@(")


def test_scores_are_finite_for_constant_units():
    on = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    off = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    s = cue_scores(on, off)
    assert torch.isfinite(s["effect"]).all() and s["effect"][0] > 100 and s["effect"][1] == 0
    assert s["auc"].tolist() == [1.0, 0.5]
    units = select_detectors(s, "L", site_shape=(1, 1, 2))
    assert [(u.unit, u.position, u.flat) for u in units] == [(0, (0, 0), 0)]
    with pytest.raises(ValueError, match="same shape"):
        cue_scores(on, off[:2])


class TwoProbes(nn.Module):
    """Units 0 and 1 of `Probes` as a 2-unit layer `units` (cue detector, content)."""

    def __init__(self):
        super().__init__()
        self.probes = Probes()
        self.units = nn.Identity()

    def forward(self, x):
        return self.units(self.probes(x)[:, :2])


def test_sae_feature_search():
    # an SAE whose feature 0 is the cue-detector direction and feature 1 the content direction
    sae = SAE(SAEConfig(d_in=2, d_sae=2, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(2))
        sae.W_enc.copy_(torch.eye(2))
    found, scores = find_cue_features(TwoProbes(), sae, "units", _images(), CUE)
    assert [f.unit for f in found] == [0] and found[0].layer == "sae:units"
    assert scores["auc"][0] == 1.0


@needs_data
def test_fashion_mnist_and_cue_rates():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y).tolist() == [1000] * 10
    d = make_cue_data(CueDataConfig(n_train=2000, n_test=500, p_target=0.9, p_other=0.0, seed=1))
    assert d.train_x.shape[0] == 2000 and torch.bincount(d.train_y).tolist() == [200] * 10
    assert d.extra_x.shape[0] == 58000  # the rest of the training split, clean
    t = d.cfg.target_class
    assert not d.train_cue[d.train_y != t].any()
    assert 0.8 < d.train_cue[d.train_y == t].float().mean() < 1.0
    assert (d.train_x[d.train_cue][:, :, 1:4, 1:4] == 1).all()
    xf, yf = d.test_set("flipped")
    has = (xf[:, 0, 1:4, 1:4] == 1).flatten(1).all(1)
    assert torch.equal(has, yf != t)
    xc, _ = d.test_set("cued")
    assert (xc[:, 0, 1:4, 1:4] == 1).all()
    with pytest.raises(ValueError, match="test set"):
        d.test_set("nope")


def test_per_position_sae_search_finds_the_feature_where_the_mark_is():
    # identity 1-channel conv: the SAE (d_in=1) has one feature, firing wherever pixels are bright
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential()
    model.add_module("conv", conv)
    sae = SAE(SAEConfig(d_in=1, d_sae=1, k=1))
    with torch.no_grad():
        sae.W_dec.fill_(1.0)
        sae.W_enc.fill_(1.0)
    found, s = find_cue_features(model, sae, "conv", _images(), CUE, control=CONTROL, per_position=True)
    assert s["shape"].tolist() == [1, 28, 28]
    assert {f.position for f in found} == {(r, c) for r in range(1, 4) for c in range(1, 4)}
    assert all(f.unit == 0 and f.flat == f.position[0] * 28 + f.position[1] for f in found)
