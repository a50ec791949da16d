#!/usr/bin/env python
"""Write tests/fixtures/peers/: small SAE checkpoints saved by each peer library's own code, with that library's
own codes and reconstructions on fixed inputs, so nacosae's tests (tests/test_interop.py) can check, with nacosae
alone, that `nacosae.interop.load_foreign_sae` computes what the peer computes.

    .venv/bin/python scripts/make_peer_fixtures.py --setup                 # build the venvs, then all fixtures
    .venv/bin/python scripts/make_peer_fixtures.py --libs sae_lens,saev    # some libraries, venvs already built
    .venv/bin/python scripts/make_peer_fixtures.py --libs saev_repo --saev-src ~/src/saev/src

Each library runs in its own virtualenv under --venvs (default /work/peer_venvs, outside the repo), because their
pins conflict with nacosae's environment and with each other (Overcomplete 0.3.0 needs matplotlib<3.9,
dictionary_learning's nnsight wants torch + torchvision). `--setup` creates them with pip:
- saev, sae_lens, sparsify: PyTorch's CPU build pinned (torch==2.13.0; where a CPU wheel of that version is on
  the pip path, no multi-GB CUDA download), then the library from PyPI. saev 0.1.0 is installed without its
  dependencies (marimo, open_clip, polars, submitit, ... are for its training and web app) plus the few that
  `saev.nn` imports.
- dictionary_learning, overcomplete: they import torchvision, whose PyPI wheels need the matching torch; these
  venvs see this repo's .venv (torch + torchvision) through a .pth file, pip pinned to those versions.
`saev_repo` (saev's current checkpoint schema, not on PyPI) needs a source checkout of saev: pass its src/ folder
as --saev-src; it runs in the saev venv with that folder first on PYTHONPATH.

Every fixture folder holds the checkpoint exactly as the library wrote it, plus
    reference.safetensors   x_BD (inputs), codes_BS and x_hat_BD as the library computes them (float32)
    reference.json          library + version, torch version, the class and arguments used, hints nacosae needs
`sae_lens_export/` goes the other way: nacosae SAEs (nacosae/), their `export_sae_lens` export (export/), and
SAELens's own codes and reconstructions of the export (reference.safetensors).

Checkpoints are tiny (d_in 16, d_sae 32): a few KB each. Weights are random but every bias (and b_dec) is nonzero,
so a misplaced bias shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "peers"
LIBS = ("saev", "saev_repo", "sae_lens", "sparsify", "dictionary_learning", "overcomplete", "sae_lens_export")
VENV_OF = {"saev_repo": "saev", "sae_lens_export": "sae_lens"}
D_IN, D_SAE, N_ROWS, SEED = 16, 32, 32, 0

# ------------------------------------------------------------------------------------------------ orchestration


def setup_venv(lib: str, venvs: Path) -> None:
    """Create the virtualenv of `lib` (see the module docstring) unless it exists."""
    venv = venvs / lib
    if (venv / ".ready").is_file():
        return
    py = "python3.11" if sys.version_info[:2] != (3, 11) else sys.executable
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    cpu_torch = venvs / "torch-cpu.txt"
    cpu_torch.write_text("torch==2.13.0\n")
    if lib in ("dictionary_learning", "overcomplete"):
        from importlib.metadata import version

        site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
        (venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "zz_host_torch.pth").write_text(site + "\n")
        pins = venvs / f"torch-host-{lib}.txt"
        pins.write_text(f"torch=={version('torch')}\ntorchvision=={version('torchvision')}\n")
        pkgs = {"dictionary_learning": ["dictionary-learning==0.1.0"],
                "overcomplete": ["overcomplete==0.3.0", "matplotlib<3.9"]}[lib]
        subprocess.run(pip + ["-c", str(pins)] + pkgs, check=True)
    else:
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        if lib == "saev":
            subprocess.run(pip + ["--no-deps", "saev==0.1.0"], check=True)
            # what saev.nn imports (0.1.0), + what the repository's saev.nn imports for --saev-src
            subprocess.run(pip + ["-c", str(cpu_torch), "beartype", "einops", "jaxtyping", "numpy", "safetensors",
                                  "orjson", "tyro", "scipy"], check=True)
        else:
            pkg = {"sae_lens": "sae-lens==6.54.12", "sparsify": "eai-sparsify==1.3.3"}[lib]
            subprocess.run(pip + ["-c", str(cpu_torch), pkg], check=True)
    (venv / ".ready").write_text("ok\n")


def run_worker(lib: str, venvs: Path, saev_src: str | None) -> None:
    python = venvs / VENV_OF.get(lib, lib) / "bin" / "python"
    if not python.exists():
        sys.exit(f"no virtualenv for {lib} at {python.parent.parent}: run with --setup")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", WANDB_MODE="disabled")
    if lib == "saev_repo":
        if not saev_src:
            sys.exit("saev_repo needs --saev-src: the src/ folder of a saev source checkout (its schema-5 format is not on PyPI)")
        env["PYTHONPATH"] = str(Path(saev_src).resolve())
    out = FIXTURES / lib
    subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", lib, "--out", str(out)], check=True, env=env, cwd="/tmp")
    print(f"wrote {out}")


def export_side(out: Path) -> None:
    """nacosae's half of sae_lens_export: deterministic nacosae SAEs and their SAELens exports (run in nacosae's env)."""
    import torch

    from nacosae.interop import export_sae_lens
    from nacosae.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(SEED)
    prov = {"backbone": "efficientnet-lite0", "layer": "blocks.5", "tokens": "spatial"}
    for arch, kw in {"topk": dict(activation="topk", k=4), "relu": dict(activation="relu"),
                     "batchtopk": dict(activation="batchtopk", k=4)}.items():
        sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, input_scale=2.5, provenance=prov, **kw))
        with torch.no_grad():
            for t in (sae.W_enc, sae.W_dec):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
            sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
            if arch == "batchtopk":
                sae.threshold.fill_(0.15)
        sae.save_pretrained(out / arch / "nacosae")
        export_sae_lens(sae, out / arch / "export")
        x_BD = torch.randn(N_ROWS, D_IN, generator=g) * 3.0 + 1.0
        from safetensors.torch import save_file

        save_file({"x_BD": x_BD}, str(out / arch / "inputs.safetensors"))


# ------------------------------------------------------------------------------------------------ workers (peer venvs)


def _inputs():
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(N_ROWS, D_IN, generator=g) * 2.0 + 0.5, g


def _randomise(params, g, scale=0.3):
    """Nonzero random values for every parameter (biases included) in place."""
    import torch

    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _write_reference(folder: Path, x, codes, x_hat, dist: str, **extra) -> None:
    from importlib.metadata import version

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"x_BD": x.float().contiguous(), "codes_BS": codes.detach().float().contiguous(),
               "x_hat_BD": x_hat.detach().float().contiguous()}, str(folder / "reference.safetensors"))
    meta = {"library": dist, "library_version": extra.pop("library_version", None) or version(dist),
            "torch": torch.__version__, **extra}
    (folder / "reference.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def worker_saev(out: Path) -> None:
    """saev 0.1.0 (PyPI): ReLU SAE, written by saev.nn.dump, read back by saev.nn.load."""
    import torch
    from saev import config, nn

    x, g = _inputs()
    sae = nn.SparseAutoencoder(config.SparseAutoencoder(d_vit=D_IN, exp_factor=D_SAE // D_IN))
    _randomise(sae.parameters(), g)
    folder = out / "relu"
    nn.dump(str(folder / "sae.pt"), sae)
    loaded = nn.load(str(folder / "sae.pt"))
    with torch.no_grad():
        x_hat, f_x, _ = loaded(x)
    _write_reference(folder, x, f_x, x_hat, "saev", saved_by="saev.nn.dump", loaded_by="saev.nn.load; forward",
                     cls="SparseAutoencoder")


def worker_saev_repo(out: Path) -> None:
    """saev's repository (schema 5): Relu, TopK (no ReLU), BatchTopK (inference threshold) by saev.nn.dump/load."""
    import saev
    import torch
    from saev.nn import modeling

    x, g = _inputs()
    commit = (Path(saev.__file__).resolve().parents[2] / "COMMIT")
    source = commit.read_text().strip() if commit.is_file() else "saev source checkout"
    acts = {"relu": modeling.Relu(), "topk": modeling.TopK(top_k=4), "batchtopk": modeling.BatchTopK(top_k=4)}
    for name, act in acts.items():
        sae = modeling.SparseAutoencoder(modeling.SparseAutoencoderConfig(d_model=D_IN, d_sae=D_SAE, activation=act))
        _randomise(sae.parameters(), g)
        if name == "topk":  # mostly negative pre-activations: rows with < k positive ones show the missing ReLU
            with torch.no_grad():
                sae.b_enc.sub_(6.0)
        if name == "batchtopk":
            sae.train()
            with torch.no_grad():  # training-mode passes set the running inference threshold, as in saev's training
                for _ in range(3):
                    sae(torch.randn(32, D_IN, generator=g) * 2.0)
        folder = out / name
        modeling.dump(folder / "sae.pt", sae)
        loaded = modeling.load(folder / "sae.pt").eval()
        with torch.no_grad():
            f_x = loaded.encode(x).f_x
            x_hat = loaded.decode(f_x)[:, -1, :]
        header = json.loads((folder / "sae.pt").read_bytes().split(b"\n", 1)[0])
        _write_reference(folder, x, f_x, x_hat, "saev", library_version=f"{header.get('lib')} ({source})",
                         schema=header["schema"], saved_by="saev.nn.modeling.dump",
                         loaded_by="saev.nn.modeling.load; eval(); encode(x).f_x; decode(f_x)[:, -1]", cls=type(act).__name__)


def worker_sae_lens(out: Path) -> None:
    """SAELens 6.x: standard, topk (rescale_acts_by_decoder_norm, no b_dec on the input), jumprelu, batchtopk
    (a BatchTopKTrainingSAE saved both as SAELens's inference model (jumprelu) and as a training checkpoint)."""
    import torch
    from sae_lens import (SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                          StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    x, g = _inputs()

    def meta():
        return SAEMetadata(model_name="efficientnet-lite0", hook_name="blocks.5")

    variants = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, apply_b_dec_to_input=False,
                                      rescale_acts_by_decoder_norm=True, metadata=meta())),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta())),
    }
    for name, sae in variants.items():
        _randomise(sae.parameters(), g)
        if name == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.6 - 0.2)  # a few θ < 0: relu(pre)·(pre > θ)
        folder = out / name
        sae.save_model(folder)
        loaded = SAE.load_from_disk(folder)
        with torch.no_grad():
            codes = loaded.encode(x)
            x_hat = loaded.decode(codes)
        _write_reference(folder, x, codes, x_hat, "sae-lens", saved_by="SAE.save_model",
                         loaded_by="SAE.load_from_disk; encode; decode", cls=type(sae).__name__)

    train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=meta()))
    _randomise([p for n, p in train.named_parameters()], g)
    with torch.no_grad():  # the running threshold, as training sets it (update_topk_threshold on BatchTopK codes)
        for _ in range(20):
            train.update_topk_threshold(train.encode(torch.randn(32, D_IN, generator=g) * 2.0))
    train.save_inference_model(out / "batchtopk")
    train.save_model(out / "batchtopk_training")
    loaded = SAE.load_from_disk(out / "batchtopk")
    with torch.no_grad():
        codes = loaded.encode(x)
        x_hat = loaded.decode(codes)
    for name in ("batchtopk", "batchtopk_training"):
        _write_reference(out / name, x, codes, x_hat, "sae-lens", cls="BatchTopKTrainingSAE",
                         saved_by="save_inference_model" if name == "batchtopk" else "save_model (training checkpoint)",
                         loaded_by="SAE.load_from_disk(batchtopk) (SAELens's inference form: jumprelu); encode; decode")


def worker_sparsify(out: Path) -> None:
    """sparsify: a TopK SparseCoder saved by save_to_disk under its hookpoint folder, and the run's config.json."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    x, g = _inputs()
    cfg = SparseCoderConfig(num_latents=D_SAE, k=4)
    sae = SparseCoder(D_IN, cfg)
    _randomise(sae.parameters(), g)
    run = out / "topk"
    hookpoint = "blocks.5"
    sae.save_to_disk(run / hookpoint)
    RunConfig(sae=cfg, model="efficientnet-lite0", hookpoints=[hookpoint]).save_json(str(run / "config.json"))
    loaded = SparseCoder.load_from_disk(run / hookpoint)
    with torch.no_grad():
        top_acts, top_idx, _ = loaded.encode(x)
        codes = torch.zeros(N_ROWS, D_SAE).scatter(-1, top_idx, top_acts)
        x_hat = loaded.decode(top_acts, top_idx)
    _write_reference(run, x, codes, x_hat, "eai-sparsify", saved_by="SparseCoder.save_to_disk + RunConfig.save_json",
                     loaded_by="SparseCoder.load_from_disk; encode; decode", cls="SparseCoder", subfolder=hookpoint)


def worker_dictionary_learning(out: Path) -> None:
    """dictionary_learning 0.1.0: trainSAE (its own loop and save: ae.pt + config.json) for a few steps per class."""
    import torch
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers import BatchTopKTrainer, JumpReluTrainer, StandardTrainer, TopKTrainer
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.training import trainSAE

    x, g = _inputs()
    steps = 30
    base = dict(steps=steps, activation_dim=D_IN, dict_size=D_SAE, layer=5, lm_name="efficientnet-lite0",
                submodule_name="blocks.5", device="cpu", seed=0)
    variants = {
        "standard": (dict(trainer=StandardTrainer, dict_class=AutoEncoder, lr=1e-2, warmup_steps=2,
                          sparsity_warmup_steps=2), AutoEncoder),
        "topk": (dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, k=4, lr=1e-2, warmup_steps=2,
                      threshold_start_step=0), AutoEncoderTopK),
        "batchtopk": (dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, k=4, lr=1e-2, warmup_steps=2,
                           threshold_start_step=0), BatchTopKSAE),
        "jumprelu": (dict(trainer=JumpReluTrainer, dict_class=JumpReluAutoEncoder, lr=1e-2, warmup_steps=2,
                          sparsity_warmup_steps=2), JumpReluAutoEncoder),
    }

    def data():
        while True:
            yield torch.randn(64, D_IN, generator=g) * 2.0 + 0.5

    import inspect

    for name, (tcfg, cls) in variants.items():
        trainer_cls = tcfg["trainer"]
        accepted = set(inspect.signature(trainer_cls.__init__).parameters)
        cfg = {k: v for k, v in {**base, **tcfg}.items() if k == "trainer" or k in accepted}
        folder = out / name
        trainSAE(data(), [cfg], steps=steps, save_dir=str(folder), device="cpu")
        trained = folder / "trainer_0"
        for f in trained.iterdir():  # flatten: the fixture folder is the one trainSAE's ae.pt sits in
            f.rename(folder / f.name)
        trained.rmdir()
        ae = cls.from_pretrained(str(folder / "ae.pt"))
        with torch.no_grad():
            codes = ae.encode(x)
            x_hat = ae.decode(codes)
        _write_reference(folder, x, codes, x_hat, "dictionary-learning", saved_by="training.trainSAE",
                         loaded_by=f"{cls.__name__}.from_pretrained(ae.pt); encode; decode", cls=cls.__name__)


def worker_overcomplete(out: Path) -> None:
    """Overcomplete 0.3.0: SAE, TopKSAE, JumpSAE trained a few steps with its train_sae; torch.save(state_dict)
    (Overcomplete has no save function of its own); read back by load_state_dict into the same class, eval()."""
    import torch
    from overcomplete.sae import SAE, JumpSAE, TopKSAE, train_sae
    from torch.utils.data import DataLoader, TensorDataset

    x, g = _inputs()
    torch.manual_seed(SEED)
    data = DataLoader(TensorDataset(torch.randn(256, D_IN, generator=g) * 2.0 + 0.5), batch_size=64)

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().mean() + 1e-3 * codes.abs().mean()

    variants = {"SAE": (SAE, {}), "TopKSAE": (TopKSAE, {"top_k": 4}), "JumpSAE": (JumpSAE, {})}
    for name, (cls, kw) in variants.items():
        sae = cls(D_IN, D_SAE, dictionary_params={"use_multiplier": True}, **kw)
        with torch.no_grad():
            sae.dictionary.multiplier.fill_(0.2)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        train_sae(sae, _Unpack(data), criterion, opt, nb_epochs=2, monitoring=0)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(sae.state_dict(), folder / "sae.pt")
        loaded = cls(D_IN, D_SAE, dictionary_params={"use_multiplier": True}, **kw)
        loaded.load_state_dict(torch.load(folder / "sae.pt", weights_only=True))
        loaded.eval()
        with torch.no_grad():
            _, codes = loaded.encode(x)
            x_hat = loaded.decode(codes)
        _write_reference(folder, x, codes, x_hat, "overcomplete", saved_by="torch.save(sae.state_dict())",
                         loaded_by=f"{name}(...).load_state_dict; eval(); encode; decode", cls=name,
                         hints={"sae_class": name, **({"top_k": kw["top_k"]} if "top_k" in kw else {})})


class _Unpack:
    """DataLoader of 1-tuples → batches, as train_sae iterates them."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (batch[0] for batch in self.loader)

    def __len__(self):
        return len(self.loader)


def worker_sae_lens_export(out: Path) -> None:
    """SAELens's codes and reconstructions of the exports written by export_side (nacosae)."""
    import torch
    from sae_lens import SAE
    from safetensors.torch import load_file

    for folder in sorted(p for p in out.iterdir() if (p / "export").is_dir()):
        sae = SAE.load_from_disk(folder / "export")
        x = load_file(str(folder / "inputs.safetensors"))["x_BD"]
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
        _write_reference(folder, x, codes, x_hat, "sae-lens", loaded_by="SAE.load_from_disk(export); encode; decode",
                         cls=type(sae).__name__)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libs", default=",".join(l for l in LIBS if l != "saev_repo"),
                   help=f"comma-separated subset of {LIBS} (default: all but saev_repo, which needs --saev-src)")
    p.add_argument("--venvs", default="/work/peer_venvs", help="folder of the per-library virtualenvs (default: %(default)s)")
    p.add_argument("--setup", action="store_true", help="create missing virtualenvs first (pip; downloads)")
    p.add_argument("--saev-src", help="src/ folder of a saev source checkout, for saev_repo")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # inside a peer's venv
        globals()[f"worker_{args.worker}"](Path(args.out))
        return 0
    libs = [l.strip() for l in args.libs.split(",") if l.strip()]
    bad = sorted(set(libs) - set(LIBS))
    if bad:
        p.error(f"unknown libs {bad}; valid: {LIBS}")
    venvs = Path(args.venvs)
    venvs.mkdir(parents=True, exist_ok=True)
    for lib in libs:
        if args.setup:
            setup_venv(VENV_OF.get(lib, lib), venvs)
        if lib == "sae_lens_export":
            export_side(FIXTURES / lib)
        run_worker(lib, venvs, args.saev_src)
        for f in (FIXTURES / lib).glob("*/inputs.safetensors"):
            f.unlink()  # the inputs are in reference.safetensors (x_BD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
