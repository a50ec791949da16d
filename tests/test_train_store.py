"""Training from a real activation store: metrics, curves, checkpoints, resume after SIGKILL, config guard."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nacosae.backbones import load_backbone
from nacosae.extract import extract
from nacosae.images import SkimageSource
from nacosae.sae import SAE
from nacosae.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A real store: a small random CNN's 8×8 map (64 tokens of 16 channels) over scikit-image's photos."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    cnn.eval()
    to_32px = lambda img: torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)
    bb = load_backbone("module", model=cnn, preprocess=to_32px, name="tiny-cnn", weights="seed0", input_shape=(3, 32, 32))
    out = tmp_path_factory.mktemp("store") / "acts"
    extract(SkimageSource(), bb, "2", "spatial", out, batch_size=8, shard_rows=256, dtype="float32", progress=False)
    return out


def _cfg(store_dir, out_dir, **kw):
    base = dict(store=str(store_dir), out_dir=str(out_dir), expansion=4, k=4, batch_size=128, n_epochs=8,
                checkpoint_every=5, log_every=2, warmup_steps=5, val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def test_train_writes_sae_metrics_and_curves(store_dir, tmp_path):
    sae, metrics = train(_cfg(store_dir, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert (run / "curves.png").stat().st_size > 1000
    loaded = SAE.from_pretrained(run / "sae")
    assert loaded.cfg.provenance["backbone"] == "tiny-cnn" and loaded.cfg.provenance["layer"] == "2"
    assert 0 <= metrics["val_fvu"] < 1.0, metrics  # better than predicting the mean
    assert metrics["val_l0"] == pytest.approx(4.0)
    assert json.loads((run / "metrics.json").read_text())["n_steps"] == metrics["n_steps"]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == metrics["n_steps"] - 1
    assert history[-1]["fvu"] < history[0]["fvu"]


def test_resume_after_sigkill(store_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "hub_scripts/train_sae.py"), "--store", str(store_dir), "--out-dir", str(out),
           "--expansion", "4", "--k", "4", "--batch-size", "64", "--n-epochs", "30", "--checkpoint-every", "5",
           "--log-every", "1", "--val-fraction", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at > 0

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming {out} at step" in done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "history has duplicated or out-of-order steps"
    assert steps[-1] == metrics["n_steps"] - 1 and killed_at < metrics["n_steps"]
    assert metrics["val_fvu"] < 1.0
    SAE.from_pretrained(out / "sae")


def test_finished_run_is_not_redone_and_not_overwritten_by_another_config(store_dir, tmp_path):
    out = tmp_path / "run"
    _, metrics = train(_cfg(store_dir, out, n_epochs=2, checkpoint_every=1), progress=False)
    assert not (out / "checkpoint").exists()  # removed once the final SAE and metrics are written
    before = (out / "sae" / "model.safetensors").stat().st_mtime_ns
    _, again = train(_cfg(store_dir, out, n_epochs=2, checkpoint_every=1), progress=False)
    assert again == metrics and (out / "sae" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another config"):
        train(_cfg(store_dir, out, n_epochs=2, k=8), progress=False)
