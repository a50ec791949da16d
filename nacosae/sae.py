"""The sparse autoencoder: one class, four objectives (METHODS §1).

Shapes use suffixes: B batch, D d_in, S d_sae, K active latents per row.

    f  = σ(W_enc (x/s − b_dec) + b_enc)        encode, s = config.input_scale
    x̂ = s · (f W_dec + b_dec)                  decode

`encode`/`decode` take and return *raw* activations: the scale lives in the config, so a loaded SAE works
on the backbone's activations as they come. `forward` is the training objective and works in scaled space.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nacosae import __version__
from nacosae.io import atomic_save_safetensors, atomic_write_json
from nacosae.kernels import TopKWorkspace, resolve_matmul_dtype, topk_autoencoder

SCHEMA_VERSION = 1
ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "topk_signed")
TRAINABLE_ACTIVATIONS = ("topk", "batchtopk", "relu")
"""nacosae trains these; "jumprelu" and "topk_signed" come only from other libraries' checkpoints (`nacosae.interop`)."""
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: wrong schema, missing tensor, other shape."""


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads (the backbone layer's channel count)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    activation: str = "topk"
    """'topk' (k per input), 'batchtopk' (k·B per batch in training, a learned threshold at inference) or 'relu' (L1).
    Inference only, for SAEs imported from other libraries (`nacosae.interop`): 'jumprelu' (f = relu(pre) where
    pre > θ_s, one threshold per latent) and 'topk_signed' (the k largest pre-activations kept as they are, negative
    ones included: saev's TopK)."""
    k: int = 32
    """Active latents per input for topk/batchtopk (mean, for batchtopk)."""
    l1_coeff: float = 1e-3
    """'relu' only: weight λ of the penalty λ Σ_i f_i ‖W_dec,i‖ (added to the FVU loss)."""
    matryoshka_sizes: tuple[int, ...] = ()
    """Nested prefix sizes, increasing and ending at d_sae (e.g. S/16, S/8, S/4, S); empty for a plain SAE.
    The loss is the mean FVU over prefixes, each prefix decoding with latents < m only (fixed prefixes,
    Bussmann et al. 2025 / Nabeshima 2024; not the random-prefix or nested-k variants)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None means d_in // 2. 0 turns AuxK off."""
    aux_coeff: float = 1 / 32
    """Weight α of the AuxK loss."""
    input_scale: float = 1.0
    """Raw activations are divided by this so that E‖x‖² = d_in (set by `SAE.init_from_data`)."""
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Where the activations came from: backbone id, weights tag, layer, token choice, preprocessing, store."""

    def __post_init__(self):
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in ("topk", "batchtopk", "topk_signed") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
        sizes = tuple(int(m) for m in self.matryoshka_sizes)
        object.__setattr__(self, "matryoshka_sizes", sizes)
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[0] <= 0 or sizes[-1] != self.d_sae):
            raise ValueError(f"matryoshka_sizes must increase strictly and end at d_sae={self.d_sae}, got {sizes}")
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {self.input_scale}")

    @property
    def n_aux(self) -> int:
        return self.d_in // 2 if self.aux_k is None else self.aux_k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CheckpointError(f"config.json has fields this version of nacosae does not know: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "matryoshka_sizes" else v) for k, v in d.items()})


def matryoshka_fractions(d_sae: int, fractions=(1 / 16, 1 / 8, 1 / 4, 9 / 16)) -> tuple[int, ...]:
    """Prefix sizes from group fractions (METHODS §1 defaults): groups of 1/16, 1/8, 1/4, 9/16 of d_sae."""
    sizes, total = [], 0.0
    for frac in fractions:
        total += frac
        sizes.append(max(1, round(total * d_sae)))
    sizes[-1] = d_sae
    return tuple(sorted(set(sizes)))


class SAEOutput(NamedTuple):
    """What one training forward pass returns. All losses are in the scaled space."""

    x_hat: Tensor
    """(B, D) reconstruction of the scaled input with all latents."""
    codes: Tensor | None
    """(B, S) dense latent code (zeros where a latent is off); None from the fast TopK path, which never forms it
    (use `top_idx`/`top_vals`, or `dense_codes`)."""
    fvu: Tensor
    """Fraction of variance unexplained over the batch, Σ‖x − x̂‖² / Σ‖x − x̄‖² (the reconstruction loss)."""
    aux_loss: Tensor
    """AuxK loss (α already applied), 0 when no latent is dead."""
    sparsity_loss: Tensor
    """L1 penalty (relu) or 0."""
    loss: Tensor
    """The objective: mean FVU over Matryoshka prefixes (or the FVU) + aux_loss + sparsity_loss."""
    l0: Tensor
    """Mean number of active latents per input."""
    top_vals: Tensor | None = None
    """(B, K) values of the k selected latents (ReLU'd; 0 where the pre-activation was ≤ 0), topk only."""
    top_idx: Tensor | None = None
    """(B, K) indices of the k selected latents, topk only."""

    def dense_codes(self, d_sae: int) -> Tensor:
        """The (B, S) dense code, built from `top_idx`/`top_vals` when the fast path left `codes` empty."""
        if self.codes is not None:
            return self.codes
        zeros_BS = self.top_vals.new_zeros(self.top_vals.shape[0], d_sae)
        return zeros_BS.scatter(-1, self.top_idx, self.top_vals)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        S, D = cfg.d_sae, cfg.d_in
        W_dec_SD = torch.randn(S, D, device=device, dtype=dtype)
        W_dec_SD /= W_dec_SD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_SD)
        self.W_enc = nn.Parameter(W_dec_SD.clone())  # a copy: a shared view breaks save/load
        self.b_enc = nn.Parameter(torch.zeros(S, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(D, device=device, dtype=dtype))
        # BatchTopK's inference threshold (scaled space); -1 = not yet estimated. JumpReLU: one threshold per latent (S,).
        threshold = torch.zeros(S) if cfg.activation == "jumprelu" else torch.tensor(-1.0)
        self.register_buffer("threshold", threshold.to(device=device, dtype=dtype))
        self.fast_topk: bool = True
        """Training forward of a TopK SAE without Matryoshka prefixes runs `nacosae.kernels.topk_autoencoder`
        (sparse decoder, sparse backward, no dense codes); False: the dense reference path below."""
        self.matmul_dtype: str = "auto"
        """Precision of the fast path's encoder matmul: 'float32', 'bfloat16' (bf16 inputs, fp32 accumulation and
        fp32 master weights) or 'auto' (bfloat16 where the hardware has a bf16 matmul, float32 elsewhere).
        A training setting, not saved with the weights; encode/decode always run in the weights' dtype."""
        self._workspace = TopKWorkspace()  # buffers the fast path reuses across steps

    # ---------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> "SAE":
        """Set input_scale so that E‖x/s‖² = d_in, and b_dec to the mean of the scaled sample."""
        x_BD = x_BD.to(self.W_dec.device, torch.float32)
        mean_sq = x_BD.pow(2).sum(-1).mean().item()
        if not mean_sq > 0:
            raise ValueError("cannot set the input scale from an all-zero activation sample")
        scale = (mean_sq / self.cfg.d_in) ** 0.5
        self.cfg = dataclasses.replace(self.cfg, input_scale=scale)
        self.b_dec.copy_((x_BD / scale).mean(0))
        return self

    # ---------------------------------------------------------------- inference (raw activations)
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """(B, S) pre-activations of the scaled, centred input."""
        x_BD = x_BD.to(self.W_enc.dtype) / self.cfg.input_scale
        return F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense (..., S) code of raw activations. Never depends on the rest of the batch (BatchTopK uses its threshold)."""
        lead = x_BD.shape[:-1]
        pre_BS = self.pre_acts(x_BD.reshape(-1, self.cfg.d_in))
        if self.cfg.activation == "topk":
            codes_BS = _topk_dense(pre_BS, self.cfg.k)
        elif self.cfg.activation == "batchtopk":
            if self.threshold.item() < 0:
                raise RuntimeError("this BatchTopK SAE has no inference threshold yet: train it first")
            codes_BS = torch.where(pre_BS > self.threshold, pre_BS, 0.0)
        elif self.cfg.activation == "jumprelu":
            codes_BS = torch.where(pre_BS > self.threshold, F.relu(pre_BS), 0.0)
        elif self.cfg.activation == "topk_signed":
            vals_BK, idx_BK = pre_BS.topk(self.cfg.k, dim=-1, sorted=False)
            codes_BS = torch.zeros_like(pre_BS).scatter(-1, idx_BK, vals_BK)
        else:
            codes_BS = F.relu(pre_BS)
        return codes_BS.reshape(*lead, self.cfg.d_sae)

    def decode(self, codes_BS: Tensor) -> Tensor:
        """Raw-space reconstruction (..., D) from a dense code."""
        return (codes_BS.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) * self.cfg.input_scale

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BD))

    # ---------------------------------------------------------------- training objective (scaled space)
    def forward(self, x_BD: Tensor, dead_mask_S: Tensor | None = None, matmul_dtype: str | torch.dtype | None = None) -> SAEOutput:
        """Training loss on raw activations `x_BD`. `dead_mask_S` marks latents the AuxK loss may use.

        `matmul_dtype` overrides `self.matmul_dtype` for this call (fast TopK path only)."""
        cfg = self.cfg
        if cfg.activation not in TRAINABLE_ACTIVATIONS:
            raise ValueError(f"activation {cfg.activation!r} is for SAEs imported from other libraries (inference only); "
                             f"nacosae trains {TRAINABLE_ACTIVATIONS}")
        x_BD = x_BD.to(self.W_enc.dtype) / cfg.input_scale
        if self.fast_topk and cfg.activation == "topk" and not cfg.matryoshka_sizes and self.W_enc.dtype == torch.float32:
            return self._forward_fast_topk(x_BD, dead_mask_S, self.matmul_dtype if matmul_dtype is None else matmul_dtype)
        pre_BS = F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc)
        if cfg.activation == "topk":
            codes_BS = _topk_dense(pre_BS, cfg.k)
        elif cfg.activation == "batchtopk":
            codes_BS = self._batchtopk_train(pre_BS)
        else:
            codes_BS = F.relu(pre_BS)

        total_var = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        if cfg.matryoshka_sizes:
            # Prefix reconstructions built incrementally: x̂_{0:m} = x̂_{0:m'} + f[m':m] W_dec[m':m].
            fvus, x_hat_BD, start = [], self.b_dec.expand_as(x_BD), 0
            for m in cfg.matryoshka_sizes:
                x_hat_BD = x_hat_BD + codes_BS[:, start:m] @ self.W_dec[start:m]
                fvus.append((x_BD - x_hat_BD).pow(2).sum() / total_var)
                start = m
            fvu, recon_loss = fvus[-1], torch.stack(fvus).mean()
        else:
            x_hat_BD = codes_BS @ self.W_dec + self.b_dec
            fvu = (x_BD - x_hat_BD).pow(2).sum() / total_var
            recon_loss = fvu

        zero = x_BD.new_zeros(())
        sparsity_loss = zero
        if cfg.activation == "relu":
            sparsity_loss = cfg.l1_coeff * (codes_BS * self.W_dec.norm(dim=1)).sum(-1).mean()

        aux_loss = zero
        if dead_mask_S is not None and cfg.n_aux > 0 and bool(dead_mask_S.any()):
            aux_loss = cfg.aux_coeff * self._aux_fvu(x_BD - x_hat_BD.detach(), pre_BS, dead_mask_S)

        l0 = (codes_BS > 0).sum(-1).float().mean()
        return SAEOutput(x_hat_BD, codes_BS, fvu, aux_loss, sparsity_loss, recon_loss + aux_loss + sparsity_loss, l0)

    def _batchtopk_train(self, pre_BS: Tensor) -> Tensor:
        """Keep the k·B largest positive pre-activations of the batch; in training mode only, track the smallest kept
        one for inference (an eval-mode forward, e.g. a validation pass, must not move the inference threshold)."""
        B = pre_BS.shape[0]
        relu_BS = F.relu(pre_BS)
        vals, idx = relu_BS.flatten().topk(min(self.cfg.k * B, relu_BS.numel()))
        codes_BS = torch.zeros_like(relu_BS).flatten().scatter(0, idx, vals).view_as(relu_BS)
        if not self.training:
            return codes_BS
        with torch.no_grad():
            kept = vals[vals > 0]
            if kept.numel():
                smallest = kept.min()
                if self.threshold < 0:
                    self.threshold.copy_(smallest)
                else:  # running average, as in dictionary_learning's BatchTopK
                    self.threshold.mul_(0.99).add_(0.01 * smallest)
        return codes_BS

    def _forward_fast_topk(self, x_BD: Tensor, dead_mask_S: Tensor | None, matmul_dtype) -> SAEOutput:
        """The TopK objective of `forward` through the sparse kernel: same losses, no (B, S) tensor but the
        pre-activations (kept in a reused buffer)."""
        cfg = self.cfg
        use_aux = dead_mask_S is not None and cfg.n_aux > 0 and bool(dead_mask_S.any())
        res = topk_autoencoder(
            x_BD, self.W_enc, self.b_enc, self.W_dec, self.b_dec, cfg.k,
            matmul_dtype=resolve_matmul_dtype(matmul_dtype, x_BD.device),
            dead_mask_S=dead_mask_S if use_aux else None, k_aux=cfg.n_aux, workspace=self._workspace,
        )
        total_var = (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = (x_BD - res.x_hat).pow(2).sum() / total_var
        zero = x_BD.new_zeros(())
        aux_loss = zero
        if use_aux:
            aux_loss = cfg.aux_coeff * self._aux_fvu_from(x_BD - res.x_hat.detach(), res.aux_vals, res.aux_idx)
        l0 = (res.top_vals > 0).sum(-1).float().mean()
        return SAEOutput(res.x_hat, None, fvu, aux_loss, zero, fvu + aux_loss, l0, res.top_vals, res.top_idx)

    def _aux_fvu(self, residual_BD: Tensor, pre_BS: Tensor, dead_mask_S: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): reconstruct the residual from the top k_aux dead latents, no second b_dec."""
        k_aux = min(self.cfg.n_aux, int(dead_mask_S.sum()))
        dead_pre_BS = pre_BS.masked_fill(~dead_mask_S, float("-inf"))
        vals_BK, idx_BK = dead_pre_BS.topk(k_aux, dim=-1)
        return self._aux_fvu_from(residual_BD, vals_BK, idx_BK)

    def _aux_fvu_from(self, residual_BD: Tensor, aux_pre_BA: Tensor, aux_idx_BA: Tensor) -> Tensor:
        e_hat_BD = F.embedding_bag(aux_idx_BA, self.W_dec, per_sample_weights=F.relu(aux_pre_BA), mode="sum")
        var = (residual_BD - residual_BD.mean(0)).pow(2).sum().clamp_min(1e-12)
        return (residual_BD - e_hat_BD).pow(2).sum() / var

    # ---------------------------------------------------------------- decoder geometry
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row, so the step moves rows on the unit sphere."""
        if self.W_dec.grad is not None:
            # g -= (g·w) w per row, as one batched dot and one fused update: no (S, D) temporaries.
            g = self.W_dec.grad
            g.addcmul_(self.W_dec, torch.einsum("sd,sd->s", g, self.W_dec).unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ---------------------------------------------------------------- save / load
    def state_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_NAMES}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `model.safetensors` + `config.json`, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(folder / WEIGHTS_NAME, self.state_tensors(), metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)})
        atomic_write_json(folder / CONFIG_NAME, {"schema_version": SCHEMA_VERSION, "library": "nacosae", "library_version": __version__, **self.cfg.to_dict()})
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        expected_d_in: int | None = None,
    ) -> "SAE":
        """Load from a local folder or a Hub repo id (+ subfolder), like `from_pretrained` elsewhere on the Hub.

        A local file or folder in another library's format (saev, SAELens, sparsify, dictionary_learning) is read by
        `nacosae.interop.load_foreign_sae` (Overcomplete checkpoints need its hints: call it directly)."""
        local = Path(path_or_repo_id) / (subfolder or "")
        if local.exists() and not (local / WEIGHTS_NAME).is_file():
            from nacosae.interop import load_foreign_sae  # only when the checkpoint is not nacosae's own

            sae = load_foreign_sae(local, device=device)
            if expected_d_in is not None and sae.cfg.d_in != expected_d_in:
                raise CheckpointError(f"this SAE reads d_in={sae.cfg.d_in} activations but the layer gives {expected_d_in}: wrong layer or backbone?")
            return sae
        config_path, weights_path = _resolve_files(path_or_repo_id, subfolder, revision)
        try:
            raw = json.loads(Path(config_path).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e}); the checkpoint is corrupt") from e
        version = raw.pop("schema_version", None)
        if version != SCHEMA_VERSION:
            raise CheckpointError(f"{config_path} has schema_version {version!r}; this nacosae ({__version__}) reads schema {SCHEMA_VERSION}")
        raw.pop("library", None)
        raw.pop("library_version", None)
        cfg = SAEConfig.from_dict(raw)
        if expected_d_in is not None and cfg.d_in != expected_d_in:
            raise CheckpointError(f"this SAE reads d_in={cfg.d_in} activations but the layer gives {expected_d_in}: wrong layer or backbone?")
        tensors = _load_tensors(weights_path)
        S, D = cfg.d_sae, cfg.d_in
        expected = {"W_enc": (S, D), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,), "threshold": (S,) if cfg.activation == "jumprelu" else ()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointError(f"{weights_path} lacks tensors {missing}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, config.json implies {shape}")
        sae = cls(cfg, device=device)
        with torch.no_grad():
            for name, t in sae.state_tensors().items():
                t.copy_(tensors[name])
        return sae.eval()


def _topk_dense(pre_BS: Tensor, k: int) -> Tensor:
    vals_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BS).scatter(-1, idx_BK, F.relu(vals_BK))


def _resolve_files(path_or_repo_id, subfolder, revision) -> tuple[str, str]:
    local = Path(path_or_repo_id) / (subfolder or "")
    if Path(path_or_repo_id).exists():
        if not local.is_dir():
            raise FileNotFoundError(f"no folder {local}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (local / name).is_file():
                raise FileNotFoundError(f"{local} has no {name}: not an SAE folder written by nacosae")
        return str(local / CONFIG_NAME), str(local / WEIGHTS_NAME)
    from nacosae.hub import hub_file  # the Hub is only touched when the path is not a local folder

    return (
        hub_file(str(path_or_repo_id), CONFIG_NAME, subfolder=subfolder, revision=revision),
        hub_file(str(path_or_repo_id), WEIGHTS_NAME, subfolder=subfolder, revision=revision),
    )


def _load_tensors(path: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt or not safetensors; re-download or re-train") from e
