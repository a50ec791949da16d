"""The lab structure view shared by the CLI and the app's "Lab" tab: model → trace → statistic → SVG + summary."""

import re
from pathlib import Path

import pytest
import torch

from nacosae.lab.data import DEFAULT_ROOT
from nacosae.lab.view import structure_view, structure_view_html

needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@needs_data
@pytest.mark.parametrize("kind", ["cnn", "mlp", "vit"])
def test_html_has_a_node_per_layer_and_unit_cells(kind):
    graph, stats, _, _ = structure_view(kind, "mean", n_probe=32)
    html = structure_view_html(kind, "mean", n_probe=32)
    nodes = set(re.findall(r'class="node"[^>]*data-node="([^"]+)"', html))
    drawn = {n.name for n in graph.nodes if n.op != "param"}
    assert drawn <= nodes, drawn - nodes
    # one cell per unit of every coloured layer
    cells = re.findall(r'class="unit"[^>]*data-node="([^"]+)"', html)
    assert stats and all(cells.count(layer) == v.numel() for layer, v in stats.items())
    assert graph.summary() in html.replace("&gt;", ">").replace("&lt;", "<").replace("&#x27;", "'").replace("&quot;", '"')


@needs_data
def test_each_statistic_has_its_meaning():
    _, mean, _, _ = structure_view("cnn", "mean", n_probe=64)
    _, rate, _, _ = structure_view("cnn", "firing_rate", n_probe=64)
    _, dead, name, title = structure_view("cnn", "dead", n_probe=64)
    assert name == "dead" and "dead" in title and "untrained" in title
    assert set(mean) == set(rate) == set(dead) == {"act1", "act2", "act3"}
    for layer in mean:
        assert (mean[layer] >= 0).all()  # post-ReLU
        assert ((rate[layer] >= 0) & (rate[layer] <= 1)).all()
        # a dead unit never fires, and never firing means it is dead
        assert torch.equal(dead[layer].bool(), rate[layer] == 0)
    # untrained seed 0 is reproducible
    _, again, _, _ = structure_view("cnn", "mean", n_probe=64)
    assert all(torch.equal(mean[k], again[k]) for k in mean)


def test_unknown_model_kind_and_statistic_say_what_to_choose():
    with pytest.raises(ValueError, match=r"unknown model kind 'resnet'.*cnn, mlp, vit"):
        structure_view_html("resnet", "mean")
    with pytest.raises(ValueError, match=r"unknown statistic 'median'.*firing_rate"):
        structure_view_html("cnn", "median")


def test_run_dir_of_another_model_kind_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model": {"kind": "cnn"}}')
    with pytest.raises(ValueError, match="holds a cnn model, not a vit"):
        structure_view("vit", "mean", run_dir=tmp_path)


def test_run_dir_without_experiment_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub_scripts/lab.py experiment"):
        structure_view(None, "", run_dir=tmp_path)


RUN = Path(__file__).resolve().parents[1] / "runs" / "lab"


@needs_data
@pytest.mark.skipif(not (RUN / "config.json").is_file(), reason="no trained lab run in runs/lab")
def test_trained_run_is_loaded_with_its_analysed_layers():
    graph, stats, _, title = structure_view(None, "firing_rate", run_dir=RUN, n_probe=64)
    assert "trained baseline" in title and set(stats) == {"act1", "act2", "act3"}
