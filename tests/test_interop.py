"""Other libraries' checkpoints load with nacosae alone and give the library's own codes; the SAELens export loads in
SAELens. The checkpoints and reference codes in tests/fixtures/peers/ were written by each library's own code
(scripts/make_peer_fixtures.py, one virtualenv per library; reference.json says which version)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from nacosae.interop import FORMATS, complete_provenance, detect_format, export_sae_lens, load_foreign_sae
from nacosae.sae import SAE, CheckpointError, SAEConfig

PEERS = Path(__file__).parent / "fixtures" / "peers"
TOL = 1e-5  # max abs difference, float32
LIB_OF = {"saev": "saev", "saev_repo": "saev", "sae_lens": "sae_lens", "sparsify": "sparsify",
          "dictionary_learning": "dictionary_learning", "overcomplete": "overcomplete"}
FIXTURES = sorted(p.parent for p in PEERS.glob("*/*/reference.json") if p.parent.parent.name in LIB_OF)


def _meta(folder: Path) -> dict:
    return json.loads((folder / "reference.json").read_text())


def _load(folder: Path, **kw) -> SAE:
    meta = _meta(folder)
    return load_foreign_sae(folder, subfolder=meta.get("subfolder"), **meta.get("hints", {}), **kw)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_every_peer_library_has_fixtures():
    """One fixture set per format; a library that cannot be installed must be reported, not silently dropped."""
    libs = {LIB_OF[f.parent.name] for f in FIXTURES}
    assert libs == set(FORMATS)
    assert {f.name for f in FIXTURES if f.parent.name == "sae_lens"} >= {"standard", "topk", "jumprelu", "batchtopk"}
    assert {f.name for f in FIXTURES if f.parent.name == "dictionary_learning"} == {"standard", "topk", "batchtopk", "jumprelu"}
    assert {f.name for f in FIXTURES if f.parent.name == "saev_repo"} == {"relu", "topk", "batchtopk"}


@pytest.mark.parametrize("folder", FIXTURES, ids=[f"{f.parent.name}/{f.name}" for f in FIXTURES])
def test_peer_checkpoint_gives_the_peers_codes(folder):
    ref = load_file(str(folder / "reference.safetensors"))
    sae = _load(folder)
    with torch.no_grad():
        codes_BS = sae.encode(ref["x_BD"])
        x_hat_BD = sae.decode(codes_BS)
    assert codes_BS.dtype == torch.float32
    assert (ref["codes_BS"] != 0).any(), "the fixture exercises nothing"
    assert _max_diff(codes_BS, ref["codes_BS"]) <= TOL
    assert _max_diff(x_hat_BD, ref["x_hat_BD"]) <= TOL
    # the same support: no latent on where the peer has it off
    assert torch.equal(codes_BS != 0, ref["codes_BS"] != 0)
    assert sae.cfg.provenance["imported_from"]["library"] == LIB_OF[folder.parent.name]


@pytest.mark.parametrize("folder", [f for f in FIXTURES if f.parent.name != "overcomplete"],
                         ids=lambda f: f"{f.parent.name}/{f.name}")
def test_from_pretrained_reads_peer_folders(folder):
    """SAE.from_pretrained dispatches a local non-nacosae folder to the converter (Overcomplete needs hints)."""
    ref = load_file(str(folder / "reference.safetensors"))
    sae = SAE.from_pretrained(folder, subfolder=_meta(folder).get("subfolder"))
    with torch.no_grad():
        assert _max_diff(sae.encode(ref["x_BD"]), ref["codes_BS"]) <= TOL
    with pytest.raises(CheckpointError, match=f"d_in={sae.cfg.d_in}.*gives 7"):
        SAE.from_pretrained(folder, subfolder=_meta(folder).get("subfolder"), expected_d_in=7)


def test_versions_are_told_apart_and_honoured():
    """saev 0.1.0 subtracts b_dec and ReLUs; saev's repository (schema 5) does neither: the fixtures cover both."""
    old, new = _load(PEERS / "saev" / "relu"), _load(PEERS / "saev_repo" / "topk")
    assert old.cfg.provenance["imported_from"]["library_version"].startswith("0.1.0")
    assert new.cfg.provenance["imported_from"]["schema"] == 5
    assert new.cfg.activation == "topk_signed"
    ref = load_file(str(PEERS / "saev_repo" / "topk" / "reference.safetensors"))
    assert (ref["codes_BS"] < 0).any(), "the schema-5 TopK fixture has no negative kept value: it tests no ReLU-free TopK"


def test_formats_are_detected():
    expected = {"saev": "saev", "saev_repo": "saev", "sae_lens": "sae_lens", "dictionary_learning": "dictionary_learning",
                "overcomplete": "overcomplete"}
    for folder in FIXTURES:
        lib = folder.parent.name
        if lib == "sparsify":
            assert detect_format(folder / _meta(folder)["subfolder"]) == "sparsify"
        else:
            assert detect_format(folder) == expected[lib]
    nacosae_folder = PEERS / "sae_lens_export" / "topk" / "nacosae"
    assert detect_format(nacosae_folder) == detect_format(nacosae_folder / "config.json") == "nacosae"
    assert load_foreign_sae(nacosae_folder / "config.json").cfg.activation == "topk"  # nacosae's own, handed over


def test_provenance_read_from_the_peer_config():
    for lib, variant in [("sae_lens", "standard"), ("dictionary_learning", "topk"), ("sparsify", "topk")]:
        prov = _load(PEERS / lib / variant).cfg.provenance
        assert (prov["backbone"], prov["layer"]) == ("efficientnet-lite0", "blocks.5"), lib
    prov = _load(PEERS / "sae_lens" / "standard").cfg.provenance
    assert prov["imported_from"]["library_version"] == _meta(PEERS / "sae_lens" / "standard")["library_version"]
    # a caller's provenance wins over the peer's
    prov = _load(PEERS / "sae_lens" / "standard", provenance={"layer": "blocks.6", "tokens": "spatial"}).cfg.provenance
    assert (prov["backbone"], prov["layer"], prov["tokens"]) == ("efficientnet-lite0", "blocks.6", "spatial")


def _tiny_backbone(width: int):
    from nacosae.backbones import load_backbone

    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, width, 3, stride=2, padding=1), relu=nn.ReLU(),
                                    conv2=nn.Conv2d(width, 8, 3, stride=2, padding=1)))
    return load_backbone("module", model=net, name="tiny-cnn", input_shape=(3, 16, 16))


def test_supplied_provenance_is_checked_against_the_backbone_width():
    """saev stores no provenance: the user names backbone/layer/tokens, and the layer's width must equal d_in."""
    folder = PEERS / "saev" / "relu"
    bb = _tiny_backbone(width=16)
    sae = load_foreign_sae(folder, provenance={"layer": "conv1", "tokens": "spatial"}, backbone=bb)
    prov = sae.cfg.provenance
    assert (prov["backbone"], prov["layer"], prov["tokens"], prov["d"]) == ("tiny-cnn", "conv1", "spatial", 16)
    assert prov["imported_from"]["library"] == "saev"
    with pytest.raises(ValueError, match=r"'conv2' of tiny-cnn gives 8-wide .* d_in=16"):
        load_foreign_sae(folder, provenance={"layer": "conv2", "tokens": "spatial"}, backbone=bb)
    with pytest.raises(ValueError, match="names no layer"):
        complete_provenance(load_foreign_sae(folder), bb)
    with pytest.raises(ValueError, match="17 wide .* d_in=16"):
        load_foreign_sae(folder, provenance={"backbone": "x", "layer": "y", "d": 17})


class _Boom:
    """Unpickling this writes a file: the test proves nacosae never unpickles arbitrary objects."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_pickles_that_need_more_than_weights_are_refused(tmp_path):
    sentinel = tmp_path / "unpickled"
    # a saev file whose torch.save payload carries an object
    raw = (PEERS / "saev" / "relu" / "sae.pt").read_bytes()
    header = raw.split(b"\n", 1)[0]
    payload = tmp_path / "payload.pt"
    torch.save({"W_enc": torch.zeros(16, 32), "evil": _Boom(str(sentinel))}, payload)
    bad = tmp_path / "saev_bad" / "sae.pt"
    bad.parent.mkdir()
    bad.write_bytes(header + b"\n" + payload.read_bytes())
    with pytest.raises(CheckpointError, match="weights_only"):
        load_foreign_sae(bad)
    # a dictionary_learning ae.pt that is a whole pickled module, as torch.save(model) writes it
    dl = tmp_path / "dl"
    shutil.copytree(PEERS / "dictionary_learning" / "topk", dl)
    torch.save({"k": torch.tensor(4), "evil": _Boom(str(sentinel))}, dl / "ae.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_foreign_sae(dl)
    assert not sentinel.exists()


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _saev_with_header(tmp_path: Path, edit) -> Path:
    raw = (PEERS / "saev_repo" / "topk" / "sae.pt").read_bytes()
    head, body = raw.split(b"\n", 1)
    header = json.loads(head)
    edit(header)
    out = tmp_path / f"saev_{len(list(tmp_path.iterdir()))}.pt"
    out.write_bytes(json.dumps(header).encode() + b"\n" + body)
    return out


def test_unknown_or_ambiguous_versions_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="schema 99"):
        load_foreign_sae(_saev_with_header(tmp_path, lambda h: h.update(schema=99)))
    with pytest.raises(CheckpointError, match="schema 1: saev moved b_dec"):
        load_foreign_sae(_saev_with_header(tmp_path, lambda h: h.update(schema=1)))

    def no_threshold(h):
        h["cfg"]["activation"] = {"cls": "BatchTopK", "params": {"top_k": 4}}
    with pytest.raises(CheckpointError, match="no inference threshold"):
        load_foreign_sae(_saev_with_header(tmp_path, no_threshold))

    folder = _copy(PEERS / "sae_lens" / "standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["sae_lens_version"] = "7.0.0"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SAELens 7.0.0"):
        load_foreign_sae(folder)


def test_what_nacosae_cannot_express_is_refused(tmp_path):
    folder = _copy(PEERS / "sae_lens" / "standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    for norm in ("layer_norm", "constant_norm_rescale"):
        (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": norm}))
        with pytest.raises(CheckpointError, match=f"normalize_activations='{norm}'"):
            load_foreign_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(CheckpointError, match="architecture 'gated'"):
        load_foreign_sae(folder)

    sp = _copy(PEERS / "sparsify" / "topk", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"several hookpoints \['blocks.5'\]: give one as subfolder"):
        load_foreign_sae(sp)
    cfg = json.loads((sp / "blocks.5" / "cfg.json").read_text())
    (sp / "blocks.5" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(CheckpointError, match="groupmax"):
        load_foreign_sae(sp, subfolder="blocks.5")

    oc = PEERS / "overcomplete" / "TopKSAE"
    with pytest.raises(ValueError, match="sae_class="):
        load_foreign_sae(oc)
    with pytest.raises(ValueError, match="needs top_k"):
        load_foreign_sae(oc, sae_class="TopKSAE")
    with pytest.raises(ValueError, match="running threshold"):
        load_foreign_sae(oc, sae_class="BatchTopKSAE")
    with pytest.raises(ValueError, match="mean nothing for format 'saev'"):
        load_foreign_sae(PEERS / "saev" / "relu", top_k=3)


def test_nothing_readable_gives_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_foreign_sae(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_foreign_sae(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not a checkpoint file"):
        load_foreign_sae(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="format must be one of"):
        load_foreign_sae(PEERS / "saev" / "relu", format="torchlens")


def test_imported_only_activations_do_not_train():
    sae = _load(PEERS / "sae_lens" / "jumprelu")
    with pytest.raises(ValueError, match="inference only"):
        sae(torch.randn(4, sae.cfg.d_in))


def test_imported_sae_round_trips_through_nacosae_format(tmp_path):
    """A converted SAE (a jumprelu one: a (S,) threshold) saves as a nacosae folder and loads back unchanged."""
    for folder in (PEERS / "sae_lens" / "jumprelu", PEERS / "saev_repo" / "topk"):
        sae = _load(folder)
        sae.save_pretrained(tmp_path / folder.name)
        back = SAE.from_pretrained(tmp_path / folder.name)
        x = load_file(str(folder / "reference.safetensors"))["x_BD"]
        with torch.no_grad():
            assert torch.equal(back.encode(x), sae.encode(x))
        assert back.cfg.provenance == sae.cfg.provenance


# ------------------------------------------------------------------------------------------------ export

EXPORTS = sorted(p for p in (PEERS / "sae_lens_export").iterdir() if p.is_dir())


@pytest.mark.parametrize("folder", EXPORTS, ids=lambda f: f.name)
def test_sae_lens_export_matches_what_sae_lens_computed(folder, tmp_path):
    """export/ was loaded by SAELens itself (reference.safetensors: its codes and reconstructions); today's export of
    the same nacosae SAE writes the same files, and nacosae's codes and x̂ equal SAELens's."""
    sae = SAE.from_pretrained(folder / "nacosae")
    assert sae.cfg.input_scale != 1.0  # the fold of the input scale is exercised
    out = export_sae_lens(sae, tmp_path / "export")
    assert json.loads((out / "cfg.json").read_text()) == json.loads((folder / "export" / "cfg.json").read_text())
    now, then = load_file(str(out / "sae_weights.safetensors")), load_file(str(folder / "export" / "sae_weights.safetensors"))
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        codes_BS = sae.encode(ref["x_BD"])
        assert _max_diff(codes_BS, ref["codes_BS"]) <= TOL
        assert _max_diff(sae.decode(codes_BS), ref["x_hat_BD"]) <= TOL
    # and nacosae reads its own export back as a SAELens checkpoint
    back = load_foreign_sae(out)
    with torch.no_grad():
        assert _max_diff(back.encode(ref["x_BD"]), codes_BS) <= TOL
    assert back.cfg.provenance["layer"] == sae.cfg.provenance["layer"]


def test_export_refuses_what_sae_lens_cannot_compute(tmp_path):
    with pytest.raises(ValueError, match="no SAELens architecture"):
        export_sae_lens(_load(PEERS / "saev_repo" / "topk"), tmp_path / "x")
    untrained = SAE(SAEConfig(d_in=4, d_sae=8, activation="batchtopk", k=2))
    with pytest.raises(ValueError, match="no inference threshold"):
        export_sae_lens(untrained, tmp_path / "y")


def test_sae_lens_loads_a_fresh_export(tmp_path):
    """Runs where SAELens is installed (its own venv: scripts/make_peer_fixtures.py); elsewhere the committed
    reference above stands in for it."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = SAE.from_pretrained(EXPORTS[0] / "nacosae")
    export_sae_lens(sae, tmp_path / "export")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "export")
    x = torch.randn(16, sae.cfg.d_in) * 3
    with torch.no_grad():
        assert _max_diff(theirs.decode(theirs.encode(x)), sae.reconstruct(x)) <= TOL


def test_older_layouts_map_as_their_libraries_map_them(tmp_path):
    """A pre-6.0 SAELens cfg.json (hook_point, activation_fn_str, no architecture) and a dictionary_learning ae.pt
    without its config.json still load to the same codes where the layout says enough, and are refused where not."""
    folder = _copy(PEERS / "sae_lens" / "standard", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32", "device": "cpu", "hook_point": "blocks.5",
           "model_name": "efficientnet-lite0", "activation_fn_str": "relu", "sae_lens_version": "3.13.0"}
    (folder / "cfg.json").write_text(json.dumps(old))
    ref = load_file(str(folder / "reference.safetensors"))
    sae = load_foreign_sae(folder)
    with torch.no_grad():
        assert _max_diff(sae.encode(ref["x_BD"]), ref["codes_BS"]) <= TOL
    assert (sae.cfg.provenance["backbone"], sae.cfg.provenance["layer"]) == ("efficientnet-lite0", "blocks.5")

    jump = _copy(PEERS / "dictionary_learning" / "jumprelu", tmp_path)
    (jump / "config.json").unlink()
    ref = load_file(str(jump / "reference.safetensors"))
    with torch.no_grad():
        assert _max_diff(load_foreign_sae(jump).encode(ref["x_BD"]), ref["codes_BS"]) <= TOL
    topk = _copy(PEERS / "dictionary_learning" / "topk", tmp_path)
    (topk / "config.json").unlink()
    with pytest.raises(CheckpointError, match="AutoEncoderTopK or BatchTopKSAE"):
        load_foreign_sae(topk)


def test_import_completes_a_nacosae_sae_that_lacks_its_provenance(tmp_path):
    """`nacosae name` tells the user to re-import an SAE whose config names no layer: the import must then write the
    layer and tokens the user gives (it used to return the folder's SAE unchanged)."""
    from nacosae.interop import load_foreign_sae

    sae = _load(PEERS / "saev_repo" / "topk")
    bare = dataclasses.replace(sae.cfg, provenance={})
    sae.cfg = bare
    sae.save_pretrained(tmp_path / "bare")
    back = load_foreign_sae(tmp_path / "bare", provenance={"layer": "blocks.0", "tokens": "spatial"})
    assert back.cfg.provenance["layer"] == "blocks.0" and back.cfg.provenance["tokens"] == "spatial"
