"""The SAE: objectives, decoder geometry, scaling, and save/load round trips on real files."""

import json

import pytest
import torch

from nacosae.sae import SAE, CheckpointError, SAEConfig, matryoshka_fractions


def test_encoder_is_a_copy_not_a_view():
    sae = SAE(SAEConfig(d_in=8, d_sae=32))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu"])
def test_forward_shapes_and_sparsity(activation):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, activation=activation, k=4))
    x = torch.randn(32, 16)
    out = sae(x)
    codes = out.dense_codes(64)  # the fast TopK path leaves `codes` empty and returns (top_idx, top_vals)
    assert out.x_hat.shape == (32, 16) and codes.shape == (32, 64)
    assert (codes >= 0).all()
    if activation == "topk":
        assert out.codes is None and out.top_idx.shape == (32, 4)
        assert ((codes > 0).sum(-1) <= 4).all()
        fast_BS = sae(x, matmul_dtype="float32").dense_codes(64)
        sae.fast_topk = False
        assert torch.allclose(sae(x).codes, fast_BS, atol=1e-5)  # the dense reference path agrees
        sae.fast_topk = True
    if activation == "batchtopk":
        assert (codes > 0).sum() <= 4 * 32
        assert sae.threshold.item() > 0  # estimated during training forward
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


def test_batchtopk_inference_does_not_depend_on_batch():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, activation="batchtopk", k=4))
    x = torch.randn(64, 16)
    sae(x)  # sets the threshold
    alone = sae.encode(x[:1])
    for others in (x[1:], 10 * torch.randn(5, 16)):
        in_batch = sae.encode(torch.cat([x[:1], others]))[:1]
        assert torch.equal(alone > 0, in_batch > 0)
        assert torch.allclose(alone, in_batch, atol=1e-5)


def test_batchtopk_threshold_moves_only_in_training_mode():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, activation="batchtopk", k=4))
    x = torch.randn(64, 16)
    sae(x)  # training mode (the default): estimates the threshold
    before = sae.threshold.clone()
    sae.eval()
    with torch.no_grad():
        sae(10 * torch.randn(32, 16))
    sae(torch.randn(32, 16))  # eval mode with grad enabled: still fixed
    assert torch.equal(sae.threshold, before)
    sae.train()
    sae(10 * torch.randn(32, 16))
    assert not torch.equal(sae.threshold, before)


def test_untrained_batchtopk_refuses_to_encode():
    sae = SAE(SAEConfig(d_in=4, d_sae=8, activation="batchtopk", k=2))
    with pytest.raises(RuntimeError, match="threshold"):
        sae.encode(torch.randn(2, 4))


def test_remove_parallel_grad_keeps_rows_on_sphere():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    sae(torch.randn(10, 8)).loss.backward()
    sae.remove_parallel_grad()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-6


def test_input_scale_makes_loaded_sae_work_on_raw_activations(tmp_path):
    torch.manual_seed(0)
    x = 50.0 * torch.randn(256, 16) + 3.0
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=8)).init_from_data(x)
    scaled = x / sae.cfg.input_scale
    assert scaled.pow(2).sum(-1).mean().item() == pytest.approx(16, rel=1e-4)
    sae.save_pretrained(tmp_path / "sae")
    loaded = SAE.from_pretrained(tmp_path / "sae")
    assert loaded.cfg.input_scale == pytest.approx(sae.cfg.input_scale)
    # reconstructions come back in raw units
    assert torch.allclose(loaded.reconstruct(x), sae.reconstruct(x), atol=1e-4)
    assert sae.reconstruct(x).abs().mean() > 10


@pytest.mark.parametrize("activation,matryoshka", [("topk", False), ("batchtopk", True), ("relu", False)])
def test_save_load_round_trip(tmp_path, activation, matryoshka):
    torch.manual_seed(0)
    sizes = matryoshka_fractions(64) if matryoshka else ()
    cfg = SAEConfig(d_in=16, d_sae=64, activation=activation, k=4, matryoshka_sizes=sizes,
                    provenance={"backbone": "efficientnet-lite0", "layer": "blocks.14"})
    sae = SAE(cfg)
    x = torch.randn(40, 16)
    sae.init_from_data(x)
    sae(x)
    folder = sae.save_pretrained(tmp_path / "sae")
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}
    meta = json.loads((folder / "config.json").read_text())
    assert meta["schema_version"] == 1 and meta["library"] == "nacosae" and meta["provenance"]["layer"] == "blocks.14"
    loaded = SAE.from_pretrained(folder)
    assert loaded.cfg == sae.cfg
    for name, t in sae.state_tensors().items():
        assert torch.equal(t, getattr(loaded, name)), name
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_matryoshka_prefix_losses():
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=8, d_sae=32, k=4, matryoshka_sizes=(4, 12, 32))
    sae = SAE(cfg)
    x = torch.randn(16, 8)
    out = sae(x)
    total_var = (x - x.mean(0)).pow(2).sum()
    expected = []
    for m in (4, 12, 32):  # each prefix decodes with latents < m only
        x_hat = out.codes[:, :m] @ sae.W_dec[:m] + sae.b_dec
        expected.append(((x - x_hat).pow(2).sum() / total_var).item())
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert out.fvu.item() == pytest.approx(expected[-1], rel=1e-5)
    with pytest.raises(ValueError, match="end at d_sae"):
        SAEConfig(d_in=8, d_sae=32, matryoshka_sizes=(4, 12))
    assert matryoshka_fractions(1024) == (64, 192, 448, 1024)


def test_aux_loss_only_with_dead_latents():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=2))
    x = torch.randn(16, 8)
    assert sae(x).aux_loss.item() == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead_mask_S=dead)
    assert out.aux_loss.item() > 0
    out.loss.backward()
    assert sae.W_dec.grad[:10].abs().sum() > 0  # dead latents get a gradient through AuxK


def test_clear_errors_on_bad_checkpoints(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    folder = sae.save_pretrained(tmp_path / "sae")

    with pytest.raises(CheckpointError, match="d_in=8.*gives 12"):
        SAE.from_pretrained(folder, expected_d_in=12)

    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        SAE.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    with pytest.raises(CheckpointError, match="W_enc has shape"):
        SAE.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        SAE.from_pretrained(folder)

    with pytest.raises(FileNotFoundError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        SAE.from_pretrained(tmp_path / "empty")


def test_bad_repo_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the local cache|not a valid Hub repo id|no Hub"):
        SAE.from_pretrained("nobody-here/no-such-sae-repo", subfolder="layer_1")
    with pytest.raises(FileNotFoundError, match="valid Hub repo id"):
        SAE.from_pretrained("not a repo id at all!!")


def test_config_checks():
    with pytest.raises(ValueError, match="activation"):
        SAEConfig(d_in=8, d_sae=16, activation="gelu")
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(d_in=8, d_sae=16, k=0)
