"""The naming and evaluation scripts sharded over 2 processes (env RANK / WORLD_SIZE, as torchrun sets them; no process
group) give the same merged result as 1 process; a MILS loop killed mid-way resumes to the uninterrupted result; the
activation table equals running the backbone. A tiny real setup: EfficientNet-Lite0 blocks.14 on 40 small Open Clip Art
images, an SAE with random weights, its feature statistics."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from nacosae.backbones import load_backbone
from nacosae.evaluate import (
    NamingRun,
    NamingRunConfig,
    assemble_results,
    build_results,
    load_run_config,
    load_thumbnail,
)
from nacosae.extract import extract
from nacosae.features import FeatureStatsConfig, compute_feature_stats
from nacosae.images import ImageRecord, ImageSource, load_rgb
from nacosae.naming.mils import MILSState, run_mils
from nacosae.naming.scorer import FeatureScorer, ImageActivationTable
from nacosae.naming.vocab import OPENCLIPART_DIR
from nacosae.results import load_results
from nacosae.sae import SAE, SAEConfig

pytestmark = pytest.mark.skipif(not OPENCLIPART_DIR.is_dir(), reason="Debian openclipart-png not installed")
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--n-features", "4", "--min-fires", "2", "--n-iterations", "2", "--n-candidates", "4", "--n-best", "3",
            "--n-images", "2", "--n-seed-prompts", "4", "--n-hints", "2", "--n-eval-renders", "3", "--n-control", "8",
            "--ms-images", "16", "--gemma-features", "0"]


class ListSource(ImageSource):
    """Open Clip Art files given by path, with the ids and labels `OpenClipArtSource` would give them."""

    name = "openclipart"

    def __init__(self, paths):
        super().__init__()
        self.paths = list(paths)

    def records(self):
        out = []
        for p in self.paths:
            rel = p.relative_to(OPENCLIPART_DIR)
            out.append(ImageRecord(image_id=f"openclipart/{rel}", source="openclipart", path=str(p), label=rel.parts[0],
                                   description=p.stem.replace("_", " ")))
        return out

    def _open(self, record):
        return load_rgb(record.path)


def _small(path, max_pixels=200_000) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.width * im.height <= max_pixels
    except Image.DecompressionBombError:
        return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    paths = []
    for c in ("animals", "food", "tools", "buildings"):
        files = [f for f in sorted((OPENCLIPART_DIR / c).rglob("*.png")) if _small(f)]
        paths += files[:: max(1, len(files) // 10)][:10]
    backbone = load_backbone("efficientnet-lite0")
    store = extract(ListSource(paths), backbone, "blocks.14", "spatial", root / "acts", batch_size=20, progress=False)
    sae = SAE(SAEConfig(d_in=store.d, d_sae=256, k=2, provenance=dict(store.provenance))).init_from_data(store.sample(800))
    sae.save_pretrained(root / "sae")
    compute_feature_stats(sae, store.iter_images(64), FeatureStatsConfig(top_n=4), out_dir=root / "stats", progress=False)
    args = ["--sae", str(root / "sae"), "--stats", str(root / "stats"), "--store", str(root / "acts")] + SETTINGS
    return {"root": root, "args": args, "backbone": backbone, "thumbs": root / "thumbs"}


def _launch(script, args, rank, world, thumbs):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "hub_scripts" / script), *args, "--thumb-dir", str(thumbs),
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_all(procs):
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _timeless(records):
    return {j: {k: v for k, v in rec.items() if k != "seconds"} for j, rec in records.items()}


def _config(setup) -> NamingRunConfig:
    kv = dict(zip([a.lstrip("-").replace("-", "_") for a in setup["args"][0::2]], setup["args"][1::2]))
    return NamingRunConfig(**{k: (v if k in ("sae", "stats", "store") else int(v)) for k, v in kv.items()})


def test_two_processes_give_the_one_process_result(setup, tmp_path):
    """The scripts on 2 ranks (RANK / WORLD_SIZE, no process group), against the library in one process."""
    methods = ["mils", "top_label", "random"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run_all([_launch("name_features.py", ["--work", str(two), "--methods", *methods, *setup["args"]], r, 2, setup["thumbs"])
              for r in (0, 1)])
    assert sorted(p.name for p in (two / "names" / "mils").glob("rank*.json")) == ["rank000.json", "rank001.json"]
    _run_all([_launch("evaluate_names.py", ["--work", str(two)], r, 2, setup["thumbs"]) for r in (0, 1)])

    ref = NamingRun(_config(setup), one, progress=False, backbone=setup["backbone"], thumb_dir=setup["thumbs"])
    for m in methods:
        ref.name_features(m)
    ref.evaluate()
    ref.monosemanticity()
    dist = NamingRun(load_run_config(two), two, progress=False, backbone=setup["backbone"], thumb_dir=setup["thumbs"])
    shard0 = json.loads((two / "names" / "mils" / "rank000.json").read_text())["records"]
    assert sorted(int(j) for j in shard0) == sorted(dist.features[0::2])  # rank 0 took features 0::2
    for m in methods:
        a, b = ref.names(m), dist.names(m)
        assert len(a) == 4 and _timeless(a) == _timeless(b), m
    assert ref.evaluations() == dist.evaluations() and len(ref.evaluations()) == 4
    ablation = ref.mils_ablation()  # the name's AUC there is the evaluation's: same renders, same control set
    for j, rec in ref.evaluations().items():
        assert ablation["features"][str(j)]["name"]["auc"] == rec["mils"]["auc"]
    assert json.loads((one / "ms.json").read_text()) == json.loads((two / "ms.json").read_text())
    rows_one, images_one, _, summary_one = assemble_results(ref)
    rows_two, images_two, _, summary_two = assemble_results(dist)
    assert rows_one == rows_two and [i["image_id"] for i in images_one] == [i["image_id"] for i in images_two]
    assert summary_one["table_all"] == summary_two["table_all"]

    # the merge step builds a dataset that load_dataset reads back, with every image a row refers to
    out = tmp_path / "ds"
    build_results(dist, out)
    ds = load_results(out, "features", cache_dir=tmp_path / "hf")
    assert sorted(ds["feature"]) == sorted(dist.features)
    assert all(n == "unnamed" or m is not None for n, m in zip(ds["name"], ds["name_method"]))
    ids = set(load_results(out, "images", cache_dir=tmp_path / "hf")["image_id"])
    for row in ds:
        refs = row["top_image_ids"] + row["cosy_render_ids_mils"] + [i for h in row["mils_history"] for i in h["render_ids"]]
        assert set(refs) <= ids
    assert (two / "figures" / "auc_all.png").is_file() and "| mils | 4 |" in (two / "results.md").read_text()

    # a finished run resumes to a no-op
    before = (two / "names" / "mils" / "rank000.json").stat().st_mtime_ns
    assert dist.name_features("mils", 0, 2) and (two / "names" / "mils" / "rank000.json").stat().st_mtime_ns == before


def test_a_loop_killed_mid_way_resumes_to_the_uninterrupted_result(setup, tmp_path):
    cfg = _config(setup)
    whole = NamingRun(cfg, tmp_path / "whole", progress=False, backbone=setup["backbone"], thumb_dir=setup["thumbs"])
    j = whole.features[0]
    want = whole._name_mils("mils", j, tmp_path / "whole" / "states")

    killed = NamingRun(cfg, tmp_path / "killed", progress=False, backbone=setup["backbone"], thumb_dir=setup["thumbs"])
    state_path = tmp_path / "killed" / "names" / "mils" / "states" / f"feature_{j:05d}.json"
    # what a run killed after two steps leaves: the state after the seed step and the first proposal round
    from nacosae.evaluate import _seed_of
    from nacosae.naming.mils import new_state, seed_prompts

    hints = killed.feature_hints(j)
    state = new_state(j, seed_prompts(killed.vocab, cfg.n_seed_prompts, seed=_seed_of(cfg.mils_seed, j), hints=hints), hints)
    for _ in range(2):
        state = run_mils(state, killed.proposer("mils"), killed.search_generator, killed.scorer, cfg.mils_config("mils"),
                         time_budget_s=0.0, progress=False)
    state.save(state_path)
    assert not MILSState.load(state_path).done and MILSState.load(state_path).iteration == 1
    got = killed.name_features("mils", 0, len(killed.features))[j]  # world = n features: this rank has only j
    assert _timeless({j: got}) == _timeless({j: want})
    assert MILSState.load(state_path).done


def test_activation_table_equals_the_backbone(setup):
    run_root = setup["root"]
    from nacosae.store import ActivationStore

    store = ActivationStore(run_root / "acts")
    sae = SAE.from_pretrained(run_root / "sae")
    table = ImageActivationTable.from_store(store, sae, "max", progress=False)
    recs = store.images[:6]
    images = [load_thumbnail(r["path"]) for r in recs]
    direct = FeatureScorer(setup["backbone"], "blocks.14", "spatial", sae).activations(images, range(sae.cfg.d_sae))
    looked_up = table.rows([r["path"] for r in recs])
    # the store holds float16 activations: equal up to that rounding, except where it flips which latents make a
    # token's top k (near-ties of the k-th and k+1-th pre-activation) and so the max over tokens
    close = torch.isclose(looked_up, direct, atol=2e-2, rtol=2e-2)
    assert close.float().mean() > 0.99, (close.float().mean(), (looked_up - direct).abs().max())
    assert looked_up.count_nonzero() > 20


def test_scripts_have_help():
    scripts = ["name_features.py", "evaluate_names.py", "build_results.py", "run_naming_offline.py"]
    code = ("import runpy, sys\n"
            "for s in sys.argv[1:]:\n"
            "    sys.argv = [s, '--help']\n"
            "    try:\n"
            "        runpy.run_path(s, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, s\n")
    out = subprocess.run([sys.executable, "-c", code, *[str(ROOT / "hub_scripts" / s) for s in scripts]], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("usage:") == 4 and "--gemma-features" in out.stdout and "RANK" in out.stdout
