"""The fast TopK training step: one autograd Function for encode → top-k → decode (METHODS §1, σ = topk).

Shapes: B batch, D d_in, S d_sae, K = k active latents per row, A = k_aux AuxK latents per row.

The plain path (`SAE.forward` with dense codes) spends most of a CPU step on work a TopK SAE does not need:
a dense (B, S) code, a dense decoder matmul over mostly-zero codes and two more dense (B, S)-sized matmuls
in the backward pass. Here only the encoder's forward matmul is dense (it must be: every latent competes in
the top-k). Everything after the top-k touches only the B·K selected entries:

    forward   pre = (x − b_dec) W_encᵀ + b_enc            dense, optionally bf16 inputs / fp32 master weights
              vals, idx = relu(topk(pre, K))             (B, K)
              x̂ = Σ_k vals[b,k] W_dec[idx[b,k]] + b_dec   F.embedding_bag (sparse decoder)
    backward  g_vals[b,k] = ⟨∂L/∂x̂_b, W_dec[idx[b,k]]⟩     sampled dense-dense product (SDDMM, CSR pattern)
              ∂W_dec = Gᵀ_vals ∂L/∂x̂,  ∂W_enc = Gᵀ_pre (x − b_dec)   sparse (S × B, CSR) @ dense (B × D)
              ∂b_enc = bincount(idx, g_pre),  ∂b_dec = Σ_b ∂L/∂x̂_b − ∂b_enc W_enc

so no (B, S) gradient is ever formed. The large per-step temporaries (the (B, S) pre-activations, the bf16
copies of W_enc and x) live in a `TopKWorkspace` reused across steps: glibc's allocator hands every
allocation above 32 MB back to the kernel when it is freed, so a fresh one is page-faulted anew each step,
which costs more than the arithmetic on a small CPU. (The (S, D) gradients are still fresh every step, as
autograd takes ownership of them; a caching allocator such as jemalloc removes that cost too, see
benchmarks/bench_sae_step.py.)

The other hot spots, each measured on a 2-core AVX512-BF16 CPU: torch's Adam with foreach=True (use
fused=True on CPU, `nacosae.train.make_optimizer`), `sparse.mm` (zero-fills and copies its output: use
`addmm(beta=0, out=)`), and torch's parallel sort (use numpy's radix sort, see `_csr_by_latent`).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MATMUL_DTYPES = ("auto", "float32", "bfloat16")


class TopKResult(NamedTuple):
    """What `topk_autoencoder` returns (scaled space)."""

    x_hat: Tensor
    """(B, D) reconstruction Σ_k vals W_dec[idx] + b_dec."""
    top_vals: Tensor
    """(B, K) float32 ReLU'd values of the k largest pre-activations (0 where the k-th largest is ≤ 0); with a
    bfloat16 encoder matmul they carry its rounding (relative error ≤ 2⁻⁸)."""
    top_idx: Tensor
    """(B, K) int64 latent indices of those values (not sorted)."""
    aux_vals: Tensor | None
    """(B, A) float32 pre-activations (before ReLU) of the top k_aux dead latents, or None without AuxK."""
    aux_idx: Tensor | None
    """(B, A) their latent indices, or None."""


@functools.lru_cache(maxsize=None)
def bf16_matmul_is_fast(device_type: str = "cpu") -> bool:
    """True where a bfloat16 matmul runs in hardware: CUDA with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere oneDNN emulates bf16 (it "supports" it on any AVX512 CPU) and the encoder would get slower.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(c is not None for c in checks):
        return any(c() for c in checks)
    try:  # older torch: ask the kernel
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_matmul_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """'auto' → bfloat16 where the hardware has a fast bf16 matmul, else float32; or the named dtype."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the encoder matmul runs in float32 or bfloat16, not {name}")
        return name
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul dtype must be one of {MATMUL_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if bf16_matmul_is_fast(torch.device(device).type) else torch.float32
    return getattr(torch, name)


class TopKWorkspace:
    """Buffers reused across training steps: the (B, S) pre-activations and the bf16 copies of the inputs.

    Nothing here is ever handed to autograd or to the caller, so a buffer may be overwritten by the next step
    while the previous step's outputs are still alive.
    """

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype or buf.device != device:
            self._buffers[name] = buf = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def clear(self) -> None:
        self._buffers.clear()

    def pre_acts(self, xc_BD: Tensor, W_enc_SD: Tensor, b_enc_S: Tensor, matmul_dtype: torch.dtype) -> Tensor:
        """(B, S) pre-activations xc W_encᵀ + b_enc in `matmul_dtype`, written into a reused buffer.

        For bfloat16 the inputs are rounded to bf16 and the matmul accumulates in float32 (oneDNN / cuBLAS);
        only the output is rounded. The master weights stay float32: the optimizer never sees bf16. As the
        weights are copied anyway, the bias rides in that matmul as an extra input column of ones
        ([xc, 1] [W_enc, b_enc]ᵀ, padded to a multiple of 16 columns): `addmm` would first broadcast b_enc over
        the whole (B, S) output and read it back (measured: the bf16 pre-activations ~5 % faster).
        """
        (B, D), S = xc_BD.shape, W_enc_SD.shape[0]
        device = xc_BD.device
        if matmul_dtype == W_enc_SD.dtype:  # no copy needed, and fp32 GEMMs prefer K = D to K = D + 16
            return torch.addmm(b_enc_S, xc_BD, W_enc_SD.t(), out=self.get("pre", (B, S), matmul_dtype, device))
        D_pad = (D + 1 + 15) // 16 * 16
        x_aug = self._buffers.get("x_aug")
        if x_aug is None or x_aug.shape != (B, D_pad) or x_aug.dtype != matmul_dtype or x_aug.device != device:
            x_aug = self.get("x_aug", (B, D_pad), matmul_dtype, device).zero_()
            x_aug[:, D] = 1.0
        W_aug = self._buffers.get("W_aug")
        if W_aug is None or W_aug.shape != (S, D_pad) or W_aug.dtype != matmul_dtype or W_aug.device != device:
            W_aug = self.get("W_aug", (S, D_pad), matmul_dtype, device).zero_()
        x_aug[:, :D].copy_(xc_BD)
        W_aug[:, :D].copy_(W_enc_SD)
        W_aug[:, D].copy_(b_enc_S)
        return torch.mm(x_aug, W_aug.t(), out=self.get("pre", (B, S), matmul_dtype, device))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor whose invariants hold by construction (so unchecked), without torch's "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_by_latent(idx_BK: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR structure of the (S × B) matrix with a 1 at (idx[b,k], b): (crow, col, order into idx.flatten()).

    crow and col are int32, the index type the sparse BLAS takes without a conversion copy.
    """
    B, K = idx_BK.shape
    flat = idx_BK.flatten()
    # A stable sort keeps each latent's rows in batch order (sequential reads in the product below). On CPU,
    # numpy's single-threaded radix sort of int16 keys beats torch's parallel sort, whose barriers stall
    # whenever another process holds a core.
    if flat.device.type == "cpu":
        keys = flat.to(torch.int16 if n_latents <= 2**15 else torch.int32).numpy()
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
    else:
        order = torch.sort(flat, stable=True).indices
    crow = torch.zeros(n_latents + 1, dtype=torch.int32, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=crow[1:])
    col = torch.div(order, K, rounding_mode="floor").to(torch.int32)
    return crow, col, order


def _scatter_rows_matmul(crow: Tensor, col: Tensor, values: Tensor, dense_BD: Tensor, n_latents: int,
                         accumulate_into: Tensor | None = None) -> Tensor:
    """(S, D) = Σ over entries (j, b, v) of v · dense[b] into row j: a CSR (S × B) @ dense (B × D) product.

    `addmm(beta=0, out=empty)` rather than `sparse.mm`, which zero-fills its output and copies the result
    once more (measured: 2.5× slower on CPU). With `accumulate_into`, adds the product to that tensor.
    """
    G_SB = _csr(crow, col, values, (n_latents, dense_BD.shape[0]))
    if accumulate_into is not None:
        return torch.addmm(accumulate_into, G_SB, dense_BD, out=accumulate_into)
    out_SD = torch.empty(n_latents, dense_BD.shape[1], dtype=dense_BD.dtype, device=dense_BD.device)
    return torch.addmm(out_SD, G_SB, dense_BD, beta=0, out=out_SD)


def _sampled_rowdot(idx_BK: Tensor, left_BD: Tensor, right_SD: Tensor) -> Tensor:
    """(B, K) with entry ⟨left[b], right[idx[b,k]]⟩: an SDDMM on the (B × S) CSR pattern of idx."""
    B, K = idx_BK.shape
    crow = torch.arange(0, B * K + 1, K, dtype=torch.int32, device=idx_BK.device)
    zeros = torch.zeros(B * K, dtype=left_BD.dtype, device=left_BD.device)
    pattern = _csr(crow, idx_BK.flatten().to(torch.int32), zeros, (B, right_SD.shape[0]))
    return torch.sparse.sampled_addmm(pattern, left_BD, right_SD.t(), beta=0.0).values().view(B, K)


class _TopKAutoencoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, W_enc_SD, b_enc_S, W_dec_SD, b_dec_D, k, matmul_dtype, dead_mask_S, k_aux, workspace):
        S = W_enc_SD.shape[0]
        xc_BD = x_BD - b_dec_D
        pre_BS = workspace.pre_acts(xc_BD, W_enc_SD, b_enc_S, matmul_dtype)
        top_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
        vals_BK = top_BK.float().relu_()
        x_hat_BD = F.embedding_bag(idx_BK, W_dec_SD, per_sample_weights=vals_BK, mode="sum").add_(b_dec_D)

        aux_vals_BA = aux_idx_BA = None
        if dead_mask_S is not None and k_aux > 0:
            # AuxK (Gao et al. 2024) needs the top pre-activations among dead latents only: take them from the
            # same pre-activations before the buffer is reused, so the encoder matmul runs once per step.
            dead_S = dead_mask_S.nonzero().squeeze(1)
            aux_pre_BA, j_BA = pre_BS.index_select(1, dead_S).topk(min(k_aux, dead_S.numel()), dim=-1, sorted=False)
            aux_vals_BA, aux_idx_BA = aux_pre_BA.float(), dead_S[j_BA]
            ctx.mark_non_differentiable(aux_idx_BA)

        ctx.save_for_backward(xc_BD, W_enc_SD, W_dec_SD, vals_BK, idx_BK, aux_idx_BA)
        ctx.n_latents = S
        ctx.mark_non_differentiable(idx_BK)
        return x_hat_BD, vals_BK, idx_BK, aux_vals_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_x_hat_BD, g_vals_BK, _g_idx, g_aux_BA, _g_aux_idx):
        xc_BD, W_enc_SD, W_dec_SD, vals_BK, idx_BK, aux_idx_BA = ctx.saved_tensors
        S = ctx.n_latents
        D = xc_BD.shape[1]
        crow, col, order = _csr_by_latent(idx_BK, S)

        # Gradient reaching the selected values: through the decoder, plus any direct use of `top_vals`.
        g_sel_BK = torch.zeros_like(vals_BK) if g_vals_BK is None else g_vals_BK.clone()
        if g_x_hat_BD is not None:
            g_sel_BK += _sampled_rowdot(idx_BK, g_x_hat_BD, W_dec_SD)
            g_W_dec_SD = _scatter_rows_matmul(crow, col, vals_BK.flatten()[order], g_x_hat_BD, S)
            g_b_dec_D = g_x_hat_BD.sum(0)
        else:
            g_W_dec_SD, g_b_dec_D = torch.zeros_like(W_dec_SD), xc_BD.new_zeros(D)
        g_pre_BK = g_sel_BK.mul_(vals_BK > 0)  # ReLU after the top-k: rows whose k-th value is ≤ 0 pass nothing

        # Encoder: only the B·K selected pre-activations (and the B·A AuxK ones) carry gradient.
        g_W_enc_SD = _scatter_rows_matmul(crow, col, g_pre_BK.flatten()[order], xc_BD, S)
        g_b_enc_S = torch.bincount(idx_BK.flatten(), weights=g_pre_BK.flatten(), minlength=S)
        if aux_idx_BA is not None and g_aux_BA is not None:
            a_crow, a_col, a_order = _csr_by_latent(aux_idx_BA, S)
            g_aux_flat = g_aux_BA.flatten().float()
            _scatter_rows_matmul(a_crow, a_col, g_aux_flat[a_order], xc_BD, S, accumulate_into=g_W_enc_SD)
            g_b_enc_S += torch.bincount(aux_idx_BA.flatten(), weights=g_aux_flat, minlength=S)
        # pre = (x − b_dec) W_encᵀ + b_enc, so ∂L/∂b_dec gets −Σ_{b,j} ∂L/∂pre[b,j] W_enc[j] = −(∂L/∂b_enc) W_enc.
        g_b_dec_D = g_b_dec_D - g_b_enc_S.to(W_enc_SD.dtype) @ W_enc_SD
        return None, g_W_enc_SD, g_b_enc_S.to(W_enc_SD.dtype), g_W_dec_SD, g_b_dec_D, None, None, None, None, None


def topk_autoencoder(
    x_BD: Tensor,
    W_enc_SD: Tensor,
    b_enc_S: Tensor,
    W_dec_SD: Tensor,
    b_dec_D: Tensor,
    k: int,
    *,
    matmul_dtype: torch.dtype = torch.float32,
    dead_mask_S: Tensor | None = None,
    k_aux: int = 0,
    workspace: TopKWorkspace | None = None,
) -> TopKResult:
    """Encode → top-k → sparse decode of the (already scaled) input `x_BD`, with a sparse backward.

    Gradients flow to W_enc, b_enc, W_dec and b_dec (not to `x_BD`); `top_vals` and `aux_vals` may be used
    in further losses (AuxK decodes `aux_vals` itself). `matmul_dtype` is the precision of the encoder's
    forward matmul only; every gradient is computed and returned in float32.
    """
    if x_BD.requires_grad:
        raise ValueError("topk_autoencoder does not compute a gradient for its input: pass activations, not a graph")
    if x_BD.dim() != 2:
        raise ValueError(f"expected a (B, D) batch, got shape {tuple(x_BD.shape)}")
    if W_enc_SD.dtype != torch.float32:
        raise ValueError(f"the fast TopK path keeps float32 master weights, got W_enc in {W_enc_SD.dtype}")
    workspace = workspace or TopKWorkspace()
    with_aux = dead_mask_S is not None and k_aux > 0 and bool(dead_mask_S.any())
    out = _TopKAutoencoder.apply(
        x_BD, W_enc_SD, b_enc_S, W_dec_SD, b_dec_D, int(k), matmul_dtype,
        dead_mask_S if with_aux else None, int(k_aux), workspace,
    )
    return TopKResult(*out)
