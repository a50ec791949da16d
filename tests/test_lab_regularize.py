"""The lab experiment end to end on a tiny configuration (real Fashion-MNIST), resume, and the CLI."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nacosae.lab.data import DEFAULT_ROOT, CueDataConfig
from nacosae.lab.models import ModelConfig, build_model
from nacosae.lab.regularize import LabConfig, SiteMask, run_experiment, train_classifier

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
)
TINY = LabConfig(
    seeds=(0,),
    methods=("baseline", "prune_region"),
    data=CueDataConfig(n_train=1000, n_test=500),
    epochs=1,
    ft_epochs=1,
    sae_steps=20,
    n_probe=200,
    n_redetect=100,
    n_ref=500,
    redetect_every=6,
    steer_alphas=(0.0, 4.0),
    threads=1,
)


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown methods"):
        LabConfig(methods=("baseline", "magic"))
    with pytest.raises(ValueError, match="≤ 60000"):
        LabConfig(data=CueDataConfig(n_train=59000))
    with pytest.raises(ValueError, match="kind='cnn'"):
        LabConfig(model=ModelConfig(kind="mlp"))
    assert LabConfig(methods=("prune_cue",)).methods == ("baseline", "prune_cue")  # the baseline is always run first


def test_site_mask_zeroes_sites_and_comes_off():
    torch.manual_seed(0)
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=8))
    mask = SiteMask(m, "act2")
    mask.sites |= {0, 5 * 14 * 14 + 3}
    rec = {}
    m.act2.register_forward_hook(lambda mod, a, out: rec.update(a2=out))
    m(torch.rand(2, 1, 28, 28))
    assert (rec["a2"][:, 0, 0, 0] == 0).all() and (rec["a2"][:, 5, 0, 3] == 0).all()
    mask.remove()
    assert len(m.act2._forward_hooks) == 1


def test_train_classifier_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    x = torch.zeros(200, 1, 28, 28)
    y = torch.arange(200) % 2
    x[y == 1, :, 10:18, 10:18] = 1.0
    m = build_model(ModelConfig(kind="cnn", width=4, hidden=8, n_classes=2))
    hist = train_classifier(m, x, y, epochs=3, lr=1e-2, batch_size=32, seed=0, progress=False)
    assert hist[-1] < hist[0]
    assert (m(x).argmax(-1) == y).float().mean() == 1.0


@needs_data
def test_tiny_experiment_runs_and_resumes(tmp_path):
    out = tmp_path / "lab"
    summary = run_experiment(TINY, out, progress=False, log=lambda s: None)
    res = json.loads((out / "results.json").read_text())
    assert set(summary["methods"]) == {"baseline", "prune_region"}
    base = next(r for r in res["runs"] if r["method"] == "baseline")
    for k in ("acc_iid", "acc_clean", "acc_flipped", "hijack", "target_recall_clean", "density", "ms_mean", "n_cue_sites"):
        assert k in base
    assert 0.1 < base["acc_clean"] <= 1.0
    ana = res["analyses"][0]
    assert "none" in ana["interventions"] and ana["interventions"]["none"]["acc_clean"] == pytest.approx(base["acc_clean"])
    assert (out / "seed0" / "baseline.safetensors").exists() and (out / "seed0" / "sae" / "config.json").exists()
    # a second call finds every piece on disk and recomputes nothing
    again = run_experiment(TINY, out, progress=False, log=lambda s: None)
    assert again["methods"] == summary["methods"]
    with pytest.raises(ValueError, match="another configuration"):
        run_experiment(replace(TINY, epochs=2), out, progress=False, log=lambda s: None)


def test_cli_help_and_structure(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "hub_scripts" / "lab.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "experiment" in r.stdout and "structure" in r.stdout
    sys.path.insert(0, str(ROOT / "hub_scripts"))
    try:
        import lab
    finally:
        sys.path.pop(0)
    lab.main(["structure", "--model", "mlp", "--out", str(tmp_path)])
    g = json.loads((tmp_path / "structure.json").read_text())
    assert g["traced_with"] == "fx" and g["n_params"] > 0
    assert (tmp_path / "structure.png").exists() and "<svg" in (tmp_path / "structure.html").read_text()
