"""The fast TopK training path (nacosae/kernels.py) against the dense autograd reference path of `SAE.forward`."""

import pytest
import torch
import torch.nn.functional as F

from nacosae.kernels import TopKWorkspace, bf16_matmul_is_fast, resolve_matmul_dtype, topk_autoencoder
from nacosae.sae import SAE, SAEConfig
from nacosae.synthetic import PlantedDictionary
from nacosae.train import DeadLatentTracker, fit

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _sae(d_in=16, d_sae=128, k=8, aux_k=None, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, aux_k=aux_k)).init_from_data(torch.randn(256, d_in) + 0.5)
    with torch.no_grad():  # a non-zero b_enc and untied encoder, so every gradient term is exercised
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae


def _grads(sae: SAE, x, fast: bool, dead=None, matmul_dtype="float32"):
    sae.fast_topk = fast
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask_S=dead, matmul_dtype=matmul_dtype)
    out.loss.backward()
    return out, {n: getattr(sae, n).grad.clone() for n in PARAMS}


@pytest.mark.parametrize("with_dead", [False, True])
def test_fast_gradients_match_autograd_reference(with_dead):
    sae = _sae(aux_k=12)
    x = 2.0 * torch.randn(64, 16) + 1.0
    dead = None
    if with_dead:
        dead = torch.zeros(128, dtype=torch.bool)
        dead[::3] = True  # some dead latents are also in a row's top-k: both gradients must add up
    ref, g_ref = _grads(sae, x, fast=False, dead=dead)
    out, g_fast = _grads(sae, x, fast=True, dead=dead)
    assert out.codes is None
    assert torch.allclose(out.dense_codes(128), ref.codes, atol=1e-5)
    for name in ("fvu", "aux_loss", "loss", "l0"):
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-5, abs=1e-7), name
    if with_dead:
        assert out.aux_loss.item() > 0
    for name in PARAMS:
        scale = g_ref[name].abs().max()
        assert scale > 0, name
        assert torch.allclose(g_fast[name], g_ref[name], atol=1e-5 * scale, rtol=1e-4), (name, (g_fast[name] - g_ref[name]).abs().max())


def test_gradient_through_top_vals_and_rows_with_nonpositive_values():
    """A loss on `top_vals` reaches the encoder; a selected value ≤ 0 (ReLU after top-k) passes no gradient."""
    torch.manual_seed(1)
    S, D, K = 32, 8, 6
    W_enc, W_dec = (0.3 * torch.randn(S, D)).requires_grad_(), torch.randn(S, D, requires_grad=True)
    b_enc = (0.5 * torch.randn(S) - 1.5).requires_grad_()  # mostly negative pre-activations: some kept values are ≤ 0
    b_dec = torch.randn(D, requires_grad=True)
    x = torch.randn(20, D)

    def reference():
        pre = F.linear(x - b_dec, W_enc, b_enc)
        vals, idx = pre.topk(K, dim=-1)
        vals = F.relu(vals)
        x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ W_dec + b_dec
        return (x_hat - x).pow(2).sum() + 0.7 * vals.pow(2).sum(), vals

    def fast():
        res = topk_autoencoder(x, W_enc, b_enc, W_dec, b_dec, K)
        return (res.x_hat - x).pow(2).sum() + 0.7 * res.top_vals.pow(2).sum(), res.top_vals

    results = []
    for f in (reference, fast):
        for p in (W_enc, b_enc, W_dec, b_dec):
            p.grad = None
        loss, vals = f()
        loss.backward()
        results.append((loss.item(), (vals == 0).sum().item(), [p.grad.clone() for p in (W_enc, b_enc, W_dec, b_dec)]))
    (l_ref, zeros_ref, g_ref), (l_fast, zeros_fast, g_fast) = results
    assert zeros_ref > 0 and zeros_fast == zeros_ref
    assert l_fast == pytest.approx(l_ref, rel=1e-5)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max(), rtol=1e-4)


def test_bf16_encoder_is_close_to_fp32():
    sae = _sae(d_in=64, d_sae=512, k=16, seed=2)
    x = torch.randn(256, 64)
    out32, g32 = _grads(sae, x, fast=True, matmul_dtype="float32")
    out16, g16 = _grads(sae, x, fast=True, matmul_dtype="bfloat16")
    assert out16.fvu.item() == pytest.approx(out32.fvu.item(), rel=2e-2)
    # most selections agree; bf16 rounding may swap near-ties at the k-th place
    same = (out16.dense_codes(512) > 0) == (out32.dense_codes(512) > 0)
    assert same.float().mean() > 0.995
    for name in PARAMS:
        cos = F.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0).item()
        assert cos > 0.98, (name, cos)
    for name in PARAMS:  # master weights and gradients stay float32
        assert getattr(sae, name).dtype == torch.float32 and g16[name].dtype == torch.float32


def test_workspace_reuse_does_not_corrupt_an_earlier_step():
    """The pre-activation buffer is overwritten by the next forward: the first backward must not depend on it."""
    sae = _sae()
    x1, x2 = torch.randn(32, 16), 3 * torch.randn(32, 16)
    _, g_alone = _grads(sae, x1, fast=True)
    sae.zero_grad(set_to_none=True)
    out1 = sae(x1, matmul_dtype="float32")
    sae(x2, matmul_dtype="float32")  # reuses and overwrites the buffers
    out1.loss.backward()
    for name in PARAMS:
        assert torch.equal(getattr(sae, name).grad, g_alone[name]), name
    assert len(sae._workspace._buffers) >= 1


def test_dead_tracker_from_topk_matches_dense_update():
    sae = _sae()
    x = torch.randn(40, 16)
    out = sae(x, matmul_dtype="float32")
    a, b = DeadLatentTracker(128, 100), DeadLatentTracker(128, 100)
    a.rows_since_fire_S += 7
    b.rows_since_fire_S += 7
    a.update(out.dense_codes(128))
    b.update_from_topk(out.top_idx, out.top_vals)
    assert torch.equal(a.rows_since_fire_S, b.rows_since_fire_S)
    assert (a.rows_since_fire_S == 0).any() and (a.rows_since_fire_S == 47).any()


def _train_planted(fast: bool, matmul_dtype: str, n_steps: int):
    planted = PlantedDictionary(d=32, n_directions=64, n_active=3, seed=1)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=256, activation="topk", k=3)).init_from_data(planted.sample(4096))
    sae.fast_topk, sae.matmul_dtype = fast, matmul_dtype
    fit(sae, planted.batches(256), n_steps, 3e-3, dead=DeadLatentTracker(256, 20 * 256), warmup_steps=20, progress=False)
    x = planted.sample(4096)
    with torch.no_grad():
        fvu = ((x - sae.reconstruct(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return fvu, planted.recovery(sae.W_dec.detach()).mean().item()


@pytest.mark.parametrize("n_steps", [300, pytest.param(1500, marks=pytest.mark.slow)])
def test_fast_path_recovers_planted_dictionary_like_the_plain_path(n_steps):
    fvu_plain, rec_plain = _train_planted(fast=False, matmul_dtype="float32", n_steps=n_steps)
    assert fvu_plain < 0.15 and rec_plain >= 0.9, (fvu_plain, rec_plain)  # the bar is reachable at all
    for dtype in ("float32", "bfloat16"):
        fvu, rec = _train_planted(fast=True, matmul_dtype=dtype, n_steps=n_steps)
        assert fvu < 0.15 and rec >= 0.9, (dtype, fvu, rec)
        assert fvu <= fvu_plain + 0.02 and rec >= rec_plain - 0.02, (dtype, fvu, fvu_plain, rec, rec_plain)


def test_matmul_dtype_choice_and_errors():
    assert resolve_matmul_dtype("float32", "cpu") == torch.float32
    assert resolve_matmul_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_matmul_dtype("auto", "cpu") == (torch.bfloat16 if bf16_matmul_is_fast("cpu") else torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_matmul_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_matmul_dtype(torch.float16, "cpu")
    W = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="not a graph"):
        topk_autoencoder(torch.randn(3, 4, requires_grad=True), W, torch.zeros(8), W, torch.zeros(4), 2)
    with pytest.raises(ValueError, match="float32 master weights"):
        topk_autoencoder(torch.randn(3, 4), W.detach().bfloat16(), torch.zeros(8), W, torch.zeros(4), 2)
    assert isinstance(TopKWorkspace().get("a", (2, 3), torch.float32, torch.device("cpu")), torch.Tensor)


def test_matryoshka_and_batchtopk_keep_the_dense_path():
    torch.manual_seed(0)
    for cfg in (SAEConfig(d_in=8, d_sae=32, k=4, matryoshka_sizes=(8, 32)), SAEConfig(d_in=8, d_sae=32, activation="batchtopk", k=4)):
        out = SAE(cfg)(torch.randn(16, 8))
        assert out.codes is not None and out.top_idx is None
