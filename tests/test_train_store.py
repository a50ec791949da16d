"""Training from real activation stores: metrics, curves, checkpoints, resume after SIGKILL, config guard; many SAEs
from one read, each equal to its own run, each resuming on its own."""

import dataclasses
import json
import os
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
from nacosae.extract import extract_many
from nacosae.images import SkimageSource
from nacosae.sae import SAE
from nacosae import train as train_module
from nacosae.store import ActivationStore
from nacosae.train import TrainConfig, train, train_many

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two real stores from one pass of a small random CNN over scikit-image's 19 photos: its 16×16 map after the
    first conv and ReLU (store "1": 256 tokens of 8 channels) and its 8×8 map (store "2": 64 tokens of 16 channels)."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    cnn.eval()
    to_32px = lambda img: torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)
    bb = load_backbone("module", model=cnn, preprocess=to_32px, name="tiny-cnn", weights="seed0", input_shape=(3, 32, 32))
    root = tmp_path_factory.mktemp("store") / "acts"
    extract_many(SkimageSource(), bb, [("1", "spatial", root / "1"), ("2", "spatial", root / "2")], batch_size=8,
                 shard_rows=256, dtype="float32", progress=False)
    return root


@pytest.fixture(scope="module")
def store_dir(stores):
    return stores / "2"


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


# ---------------------------------------------------------------- many SAEs per read
def _many(stores, root, **kw):
    """Four SAEs on two stores: widths, k, activations and epochs differ."""
    specs = [("2", "a", dict(expansion=4, k=4)), ("2", "b", dict(activation="batchtopk", d_sae=48, k=2, n_epochs=1)),
             ("2", "c", dict(activation="relu", expansion=2, l1_coeff=1e-3)), ("1", "d", dict(expansion=2, k=3, n_epochs=2))]
    return [_cfg(stores / s, root / name, **{**spec, **kw}) for s, name, spec in specs]


def _same_sae(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _history(run):
    return [json.loads(line) for line in (Path(run) / "history.jsonl").read_text().splitlines()]


def test_many_saes_from_one_read_equal_separate_runs(stores, tmp_path, monkeypatch):
    reads = []
    real = ActivationStore.iter_batches
    monkeypatch.setattr(ActivationStore, "iter_batches",
                        lambda self, *a, **k: reads.append((self.path.name, k.get("shuffle", True))) or real(self, *a, **k))
    cfgs = _many(stores, tmp_path / "many")
    together = train_many(cfgs, progress=False)
    assert sorted(reads) == [("1", False), ("1", True), ("2", False), ("2", True)]  # one train and one val read per store
    for cfg, (sae, metrics) in zip(cfgs, together, strict=True):
        alone_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "alone" / Path(cfg.out_dir).name))
        alone, alone_metrics = train(alone_cfg, progress=False)
        assert _same_sae(sae, alone), cfg  # bit for bit: same init, same batches, same steps
        drop = ("rows_per_s", "step_rows_per_s", "n_saes_in_run")
        assert {k: v for k, v in metrics.items() if k not in drop} == {k: v for k, v in alone_metrics.items() if k not in drop}
        assert [r["fvu"] for r in _history(cfg.out_dir)] == [r["fvu"] for r in _history(alone_cfg.out_dir)]
        assert (Path(cfg.out_dir) / "curves.png").is_file() and not (Path(cfg.out_dir) / "checkpoint").exists()
        assert metrics["n_saes_in_run"] == (3 if Path(cfg.store).name == "2" else 1)
    assert together[1][1]["n_steps"] < together[0][1]["n_steps"]  # its own schedule: fewer epochs, fewer steps


def test_many_saes_resume_each_from_its_own_checkpoint(stores, tmp_path, monkeypatch, capsys):
    """A kill lands between two SAEs' checkpoints (a at step 10; c, and d of the other store, still at 5; b finished its
    one epoch and holds a checkpoint at its last step): the rerun resumes every SAE from its own step and loses
    nothing: b, whose steps all ran before the kill, equals its uninterrupted run bit for bit."""
    cfgs = _many(stores, tmp_path / "many")
    real = train_module._Run.checkpoint

    def power_cut(self, step):
        if self.out.name == "c" and step == 10:
            raise RuntimeError("power cut")
        real(self, step)

    monkeypatch.setattr(train_module._Run, "checkpoint", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        train_many(cfgs, progress=False)
    monkeypatch.setattr(train_module._Run, "checkpoint", real)
    state = {c.out_dir[-1]: json.loads((Path(c.out_dir) / "checkpoint/trainer_state.json").read_text())["step"] for c in cfgs}
    n_b = _history(cfgs[1].out_dir)[-1]["step"] + 1  # b's last step ran and is in its history
    assert state == {"a": 10, "b": n_b, "c": 5, "d": 5} and n_b < 10
    capsys.readouterr()
    results = train_many(cfgs, progress=True)
    said = capsys.readouterr()
    for name, step in state.items():
        assert f"resuming {tmp_path / 'many' / name} at step {step}/" in said.out
    for cfg, (_, metrics) in zip(cfgs, results, strict=True):
        steps = [r["step"] for r in _history(cfg.out_dir)]
        assert steps == sorted(set(steps)) and steps[-1] == metrics["n_steps"] - 1, cfg.out_dir
        assert metrics["val_fvu"] < 1.0
    alone, _ = train(dataclasses.replace(cfgs[1], out_dir=str(tmp_path / "alone-b")), progress=False)
    assert _same_sae(results[1][0], alone)


def test_saes_on_one_store_share_its_stream_settings(stores, tmp_path):
    cfgs = [_cfg(stores / "2", tmp_path / "a"), _cfg(stores / "2", tmp_path / "b", batch_size=64)]
    with pytest.raises(ValueError, match="one batch_size"):
        train_many(cfgs, progress=False)
    with pytest.raises(ValueError, match="share an out_dir"):
        train_many([_cfg(stores / "2", tmp_path / "a"), _cfg(stores / "1", tmp_path / "a")], progress=False)


def test_cli_sweep_sigkill_then_rerun_resumes_every_sae(stores, tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "hub_scripts/train_sae.py"), "--store", str(stores / "2"), "--store", str(stores / "1"),
           "--out-dir", str(out), "--sweep", "k=2,4", "--expansion", "2", "--batch-size", "64", "--n-epochs", "20",
           "--checkpoint-every", "5", "--log-every", "1", "--val-fraction", "0.2"]
    runs = [out / s / f"k{k}" for s in ("2", "1") for k in (2, 4)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    states = [r / "checkpoint" / "trainer_state.json" for r in runs]
    deadline = time.time() + 120
    while not all(s.exists() for s in states) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(s.exists() for s in states), "no checkpoint of every SAE before the kill"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for run in runs:
        assert f"resuming {run} at step" in done.stdout
        metrics = json.loads((run / "metrics.json").read_text())
        steps = [r["step"] for r in _history(run)]
        assert steps == sorted(set(steps)) and steps[-1] == metrics["n_steps"] - 1
        assert SAE.from_pretrained(run / "sae").cfg.k == int(run.name[1:])
    bad = tmp_path / "runs.json"
    bad.write_text(json.dumps([{"store": str(stores / "2"), "out_dir": str(tmp_path / "x")},
                               {"store": str(stores / "2"), "out_dir": str(tmp_path / "y"), "seed": 1}]))
    res = subprocess.run([sys.executable, str(ROOT / "hub_scripts/train_sae.py"), "--runs", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "need one seed" in res.stderr


# ---------------------------------------------------------------- data parallel under torchrun
def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc), listed before any is killed."""
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(c) for c in f.read().split()]
    return [pid] + [d for k in kids for d in _process_tree(k)]


def test_torchrun_two_processes_train_then_resume_after_sigkill(store_dir, tmp_path):
    """2 CPU processes (gloo), each reading its own half of the training images: killed (the launcher and its workers)
    after a checkpoint, the same command resumes and finishes; the SAE is as good as one process's (other batches,
    so not the same numbers: tests/test_train.py shows the step equals one process's on the same global batch)."""
    out = tmp_path / "run"
    args = ["--store", str(store_dir), "--out-dir", str(out), "--expansion", "4", "--k", "4", "--batch-size", "64",
            "--n-epochs", "10", "--checkpoint-every", "5", "--log-every", "1", "--val-fraction", "0.2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "hub_scripts/train_sae.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 180
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    for pid in _process_tree(proc.pid):  # the launcher and its workers (each in its own session), all at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    killed_at = json.loads(state.read_text())["step"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming {out} at step {killed_at}/" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == metrics["n_steps"] - 1
    _, alone = train(_cfg(store_dir, tmp_path / "alone", batch_size=64, n_epochs=10), progress=False)
    assert metrics["n_steps"] == alone["n_steps"]  # the same global batches per epoch
    assert metrics["val_fvu"] < 1.0 and abs(metrics["val_fvu"] - alone["val_fvu"]) < 0.1, (metrics, alone)


def test_cli_runs_file_errors_name_the_file_and_the_missing_key(tmp_path, capsys):
    """--runs with broken JSON, or an entry without its out_dir: one line naming the file and what is wrong."""
    from nacosae.cli import main as nacosae_main

    broken = tmp_path / "broken.json"
    broken.write_text('[{"out_dir": "x"')
    no_out = tmp_path / "no_out.json"
    no_out.write_text(json.dumps([{"store": "s", "k": 4}]))
    for path, said in ((broken, f"{broken} is not valid JSON: "),
                       (no_out, f"{no_out} entry 0 has no 'out_dir': every entry needs its \"out_dir\"")):
        with pytest.raises(SystemExit) as e:
            nacosae_main(["train", "--runs", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "Traceback" not in err


def test_a_warmup_that_never_ends_is_warned_and_the_cli_takes_threads_and_no_progress(store_dir, tmp_path, capsys):
    import warnings

    from hub_scripts.train_sae import main as train_cli

    with pytest.warns(UserWarning, match="peak lr is never reached"):
        train(_cfg(store_dir, tmp_path / "short", n_epochs=1, warmup_steps=50), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the usual config: no warning
        train(_cfg(store_dir, tmp_path / "usual"), progress=False)
    train_cli(["--store", str(store_dir), "--out-dir", str(tmp_path / "cli"), "--k", "4", "--expansion", "2",
               "--batch-size", "128", "--n-epochs", "2", "--warmup-steps", "2", "--threads", "1", "--no-progress"])
    out = capsys.readouterr()
    assert '"val_fvu"' in out.out and "train SAE" not in out.err
