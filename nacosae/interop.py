"""Other libraries' SAE checkpoints in, SAELens's format out: so nacosae can name the features of any vision SAE.

    sae = load_foreign_sae("runs/their_sae")                                  # format detected from the files
    sae = load_foreign_sae("sae.pt", provenance={"backbone": "efficientnet-lite0", "layer": "blocks.14",
                                                 "tokens": "spatial"}, backbone=bb)   # width checked against bb
    export_sae_lens(sae, "runs/for_saelens")                                  # cfg.json + sae_weights.safetensors

`SAE.from_pretrained` calls `load_foreign_sae` for a local path that is not a nacosae folder.

WHAT "THE SAME SAE" MEANS. The loaded nacosae SAE computes, on raw activations, the codes the peer library itself
computes when it loads that checkpoint with its own default loader (tested on checkpoints each library wrote, see
tests/fixtures/peers/, max abs difference ≤ 1e-5 in float32). nacosae's SAE is

    f = σ(W_enc (x/s − b_dec) + b_enc),    x̂ = s · (f W_dec + b_dec)

and each peer maps onto it exactly, in arithmetic:
- a peer that does not subtract b_dec before encoding, σ(W x + b), becomes b_enc = b + W b_dec (computed in float64);
- a peer without a decoder bias gets b_dec = 0; s = 1 everywhere: SAELens and dictionary_learning fold their input
  scaling into the weights when they save; saev keeps its dataset scaling (`scale_norm`) in its data config, not in
  the checkpoint, so a saev SAE (there and here alike) reads activations scaled the way its training data was;
- SAELens's `rescale_acts_by_decoder_norm` is folded as SAELens folds it (W_enc·‖W_dec‖, b_enc·‖W_dec‖, W_dec/‖W_dec‖);
- σ: relu; topk (the k largest pre-activations, then ReLU); batchtopk (f = pre where pre > θ, θ ≥ 0 one scalar);
  jumprelu (f = relu(pre) where pre > θ_s, one threshold per latent); topk_signed (saev's TopK, no ReLU).

FORMATS AND THEIR VERSIONS (read from the files; anything else is refused with the reason):
- "saev": one file (`sae.pt`): a JSON header line, then `torch.save(state_dict)`.
  * no "schema" field = saev 0.1.0 (PyPI) and earlier: ReLU, b_dec subtracted before encoding.
  * "schema" 2–5 = saev's repository since mid-2025: b_dec NOT subtracted; TopK keeps the k largest values without
    a ReLU; BatchTopK at inference keeps pre > θ (θ = `activation.threshold`, pre > 0 when θ ≤ 0); schema 2–3
    BatchTopK checkpoints have no threshold (batch-dependent codes) and are refused.
  * "schema" 1 is refused: saev changed where b_dec goes while writing schema 1 (its own loader says so), so the
    file does not say which encoder it needs. Any newer schema is refused until read here.
- "sae_lens": a folder with `cfg.json` + `sae_weights.safetensors` (SAELens ≤ 6.x; pre-6.0 configs are mapped as
  SAELens maps them). Architectures standard, topk, jumprelu (SAELens saves BatchTopK as jumprelu) and a BatchTopK
  training checkpoint (`topk_threshold`, read as SAELens's inference conversion reads it). `apply_b_dec_to_input`
  honoured; `normalize_activations` none / expected_average_only_in / covariance_whitening (SAELens applies nothing
  at inference for these); layer_norm and constant_norm_rescale are per-input normalisations nacosae's SAE does
  not have: refused. hook_z reshaping, gated, transcoders: refused.
- "sparsify": a folder with `cfg.json` + `sae.safetensors` (one folder per hookpoint; give the hookpoint as
  `subfolder`). TopK on relu(W (x − b_dec) + b). groupmax, transcoders and skip connections are refused.
- "dictionary_learning": a folder with `ae.pt` (a state_dict, `torch.save`) + `config.json` (0.1.0 layout:
  trainer.dict_class). AutoEncoder (ReLU; its loader rescales a decoder whose columns are not unit-norm, and so do
  we), AutoEncoderTopK (topk), BatchTopKSAE (threshold; θ < 0 means never estimated = ReLU), JumpReluAutoEncoder
  (b_dec not subtracted).
- "overcomplete": `torch.save(sae.state_dict())` of an Overcomplete SAE (it has no format of its own, so the class
  is a hint: sae_class="SAE" | "TopKSAE" | "JumpSAE", top_k=). The default linear encoder (or a TieableEncoder);
  the eval-mode dictionary = l2-normalised atoms × exp(multiplier); no decoder bias. BatchTopKSAE keeps its
  running threshold outside the state_dict and is refused.

PICKLES. Every `.pt` is read with `torch.load(weights_only=True)` and must be a flat dict of tensors; a file that
needs more (a pickled module or arbitrary objects) is refused, never unpickled.

PROVENANCE. The peer's own record of where its activations came from (SAELens metadata model_name/hook_name,
dictionary_learning lm_name/submodule_name, sparsify's run config.json model + the hookpoint folder) fills
`provenance["backbone"/"layer"]`; what the caller passes in `provenance` wins; `backbone=` (a loaded
`nacosae.backbones.Backbone`) checks the layer's activation width against d_in and completes the provenance.
What the peer's config said is kept under `provenance["imported_from"]`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nacosae.sae import SAE, CheckpointError, SAEConfig

FORMATS = ("saev", "sae_lens", "sparsify", "dictionary_learning", "overcomplete")
SAEV_SCHEMAS = (2, 3, 4, 5)
"""saev header schemas read with the repository's encoder (no b_dec subtraction, TopK without ReLU)."""
SAE_LENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config layout `export_sae_lens` writes (metadata.sae_lens_version): SAELens ≥ 6 reads it as is."""
_SAE_LENS_RUNTIME_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


@dataclass
class _Parts:
    """A peer checkpoint in nacosae's layout, before the b_dec fold. Shapes: S d_sae, D d_in."""

    activation: str
    W_enc_SD: Tensor
    b_enc_S: Tensor
    W_dec_SD: Tensor
    b_dec_D: Tensor
    b_dec_in_encoder: bool
    """True when the peer encodes W (x − b_dec) + b; False for W x + b (folded into b_enc)."""
    k: int | None = None
    threshold: Tensor | None = None
    """() for batchtopk, (S,) for jumprelu."""
    peer: dict[str, Any] = field(default_factory=dict)
    """What the peer's files said: format, library version, architecture, the config itself."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """backbone/layer read from the peer's config, when it has them."""


# ---------------------------------------------------------------------------------------------------------------- entry


def load_foreign_sae(
    path: str | os.PathLike,
    format: str | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    subfolder: str | None = None,
    backbone=None,
    device: str | torch.device = "cpu",
    **hints: Any,
) -> SAE:
    """Load another library's SAE checkpoint as a nacosae `SAE` (eval mode, float32) that computes the peer's codes.

    path: a checkpoint file or folder (see the module docstring for each format's files); subfolder: joined to path
    (a sparsify hookpoint). format: one of FORMATS, or None to detect it from the files. provenance: what the caller
    knows of the activations (backbone, layer, tokens, ...); it overrides what the peer's config says.
    backbone: a loaded `nacosae.backbones.Backbone`; the SAE's d_in is checked against `backbone.d(layer)` and the
    provenance completed with `backbone.provenance(layer, tokens)`. hints: what a format does not store
    (Overcomplete: sae_class, top_k).

    Raises FileNotFoundError (nothing readable at path), CheckpointError (a format or version nacosae does not read,
    a pickle that needs more than weights_only, wrong shapes) and ValueError (bad provenance or hints).
    """
    path = Path(path) / (subfolder or "")
    if not path.exists():
        raise FileNotFoundError(f"no file or folder {path}")
    fmt = format or detect_format(path)
    if fmt == "nacosae":
        sae = SAE.from_pretrained(path.parent if path.is_file() else path, device=device)
        if provenance:  # the caller completes what the checkpoint lacks (e.g. a nacosae SAE saved without its layer)
            sae.cfg = _replace_provenance(sae.cfg, {**(sae.cfg.provenance or {}), **provenance})
        if backbone is not None:
            complete_provenance(sae, backbone)
        return sae
    readers = {"saev": _read_saev, "sae_lens": _read_sae_lens, "sparsify": _read_sparsify,
               "dictionary_learning": _read_dictionary_learning, "overcomplete": _read_overcomplete}
    if fmt not in readers:
        raise ValueError(f"format must be one of {FORMATS} (or None to detect it), got {fmt!r}")
    allowed_hints = {"overcomplete": {"sae_class", "top_k"}}.get(fmt, set())
    unknown = set(hints) - allowed_hints
    if unknown:
        raise ValueError(f"hints {sorted(unknown)} mean nothing for format {fmt!r}" + (f"; it takes {sorted(allowed_hints)}" if allowed_hints else ""))
    parts = readers[fmt](path, **hints)
    parts.peer = {"format": fmt, "path": str(path.resolve()), **parts.peer}
    sae = _build(parts, device)
    prov = {**parts.provenance, **(provenance or {}), "imported_from": parts.peer}
    sae.cfg = _replace_provenance(sae.cfg, prov)
    if backbone is not None:
        complete_provenance(sae, backbone)
    elif "d" in prov and int(prov["d"]) != sae.cfg.d_in:
        raise ValueError(f"provenance says the layer is {prov['d']} wide but this SAE reads d_in={sae.cfg.d_in}")
    return sae


def complete_provenance(sae: SAE, backbone) -> SAE:
    """Check that `backbone`'s layer (from sae.cfg.provenance: layer, tokens) gives d_in-wide activations, and fill
    in the backbone's full provenance (weights, preprocessing, token counts). Raises ValueError naming both widths."""
    prov = dict(sae.cfg.provenance)
    layer, tokens = prov.get("layer"), prov.get("tokens", "all")
    if not layer:
        raise ValueError("the SAE's provenance names no layer: pass provenance={'layer': ..., 'tokens': ...}")
    width = backbone.d(layer)
    if width != sae.cfg.d_in:
        raise ValueError(f"layer {layer!r} of {backbone.name} gives {width}-wide activations but this SAE reads "
                         f"d_in={sae.cfg.d_in}: wrong backbone or layer (check the checkpoint's documentation)")
    full = backbone.provenance(layer, tokens)
    sae.cfg = _replace_provenance(sae.cfg, {**full, **{k: v for k, v in prov.items() if k not in full or k == "imported_from"}})
    return sae


def detect_format(path: str | os.PathLike) -> str:
    """Which format the file or folder at `path` is in: 'nacosae' or one of FORMATS. Raises FileNotFoundError
    listing what each format's files look like when none matches."""
    path = Path(path)
    if path.is_file():
        name = path.name
        if name in ("model.safetensors", "config.json") and (path.parent / "model.safetensors").is_file():
            return "nacosae"
        if name in ("sae_weights.safetensors", "cfg.json") and (path.parent / "sae_weights.safetensors").is_file():
            return "sae_lens"
        if name == "sae.safetensors":
            return "sparsify"
        if name == "ae.pt":
            return "dictionary_learning"
        with open(path, "rb") as fd:
            head = fd.read(1)
        if head == b"{":
            return "saev"  # a JSON header line before the torch.save payload
        if zipfile.is_zipfile(path):
            keys = set(_torch_load_weights(path, str(path)))
            if any(k.startswith(("dictionary._weights", "encoder.final_block.")) for k in keys):
                return "overcomplete"
            if {"encoder.weight", "encoder.bias", "decoder.weight"} <= keys or {"W_enc", "threshold", "b_dec"} <= keys:
                return "dictionary_learning"
        raise FileNotFoundError(f"{path} is not a checkpoint file nacosae reads: {_FILES_HELP}")
    files = {p.name for p in path.iterdir()}
    if {"config.json", "model.safetensors"} <= files:
        return "nacosae"
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        return "sae_lens"
    if {"cfg.json", "sae.safetensors"} <= files:
        return "sparsify"
    if "ae.pt" in files:
        return "dictionary_learning"
    pts = sorted(n for n in files if n.endswith((".pt", ".pth")))
    if len(pts) == 1:  # saev's sae.pt, or an Overcomplete state_dict: the file itself says which
        return detect_format(path / pts[0])
    hookpoints = sorted(p.name for p in path.iterdir() if (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file())
    if hookpoints:
        raise FileNotFoundError(f"{path} holds sparsify SAEs for several hookpoints {hookpoints}: give one as subfolder")
    if "config.json" in files:
        raise FileNotFoundError(f"{path} has config.json but no model.safetensors: not a whole nacosae SAE folder, nor {_FILES_HELP}")
    raise FileNotFoundError(f"{path} has no config.json + model.safetensors (nacosae), nor {_FILES_HELP}")


_FILES_HELP = ("a saev sae.pt (JSON header line + torch.save), cfg.json + sae_weights.safetensors (SAELens), "
               "cfg.json + sae.safetensors (sparsify), ae.pt + config.json (dictionary_learning) or an Overcomplete "
               "state_dict .pt")


# ---------------------------------------------------------------------------------------------------------------- build


def _build(parts: _Parts, device) -> SAE:
    S, D = parts.W_enc_SD.shape
    shapes = {"W_enc": (parts.W_enc_SD, (S, D)), "b_enc": (parts.b_enc_S, (S,)), "W_dec": (parts.W_dec_SD, (S, D)),
              "b_dec": (parts.b_dec_D, (D,))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{parts.peer.get('path')}: {name} has shape {tuple(t.shape)}, expected {shape} "
                                  f"from W_enc's (d_sae={S}, d_in={D})")
    W_enc = parts.W_enc_SD.double()
    b_enc = parts.b_enc_S.double()
    if not parts.b_dec_in_encoder:
        # σ(W x + b) = σ(W (x − b_dec) + (b + W b_dec)): nacosae always subtracts b_dec, so the peer's bias moves.
        b_enc = b_enc + W_enc @ parts.b_dec_D.double()
    kw = {"k": parts.k} if parts.k is not None else {}
    cfg = SAEConfig(d_in=D, d_sae=S, activation=parts.activation, **kw)
    sae = SAE(cfg, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(parts.W_dec_SD)
        sae.b_dec.copy_(parts.b_dec_D)
        if parts.threshold is not None:
            if tuple(parts.threshold.shape) != tuple(sae.threshold.shape):
                raise CheckpointError(f"{parts.peer.get('path')}: threshold has shape {tuple(parts.threshold.shape)}, "
                                      f"expected {tuple(sae.threshold.shape)}")
            sae.threshold.copy_(parts.threshold)
    return sae.eval()


def _replace_provenance(cfg: SAEConfig, prov: dict[str, Any]) -> SAEConfig:
    import dataclasses

    return dataclasses.replace(cfg, provenance=json.loads(json.dumps(prov, default=str)))


def _torch_load_weights(src: str | os.PathLike | bytes, what: str) -> dict[str, Tensor]:
    """A flat dict of tensors from a torch.save payload, read with weights_only=True; anything else is refused."""
    buffer = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        obj = torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} needs more than tensors to unpickle ({first}). nacosae reads pickles only with "
                              "torch.load(weights_only=True) and refuses this file; re-save it from its library as a "
                              "state_dict of tensors (torch.save(model.state_dict(), path))") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {what} as a torch.save file ({e}); it is corrupt or not a checkpoint") from e
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} is not a state_dict (a flat dict of tensors) but {type(obj).__name__}; "
                              "re-save it with torch.save(model.state_dict(), path)")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in obj.items()}


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    try:
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt or not safetensors") from e


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


def _need(tensors: dict[str, Tensor], names, what: str) -> None:
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CheckpointError(f"{what} lacks tensors {missing} (it has {sorted(tensors)})")


# ---------------------------------------------------------------------------------------------------------------- saev


def _read_saev(path: Path) -> _Parts:
    file = path / "sae.pt" if path.is_dir() else path
    raw = file.read_bytes()
    newline = raw.find(b"\n")
    if not raw.startswith(b"{") or newline < 0:
        raise CheckpointError(f"{file} does not start with saev's JSON header line")
    try:
        header = json.loads(raw[:newline])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: the JSON header line does not parse ({e}); the checkpoint is corrupt") from e
    state = _torch_load_weights(raw[newline + 1:], str(file))
    _need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), str(file))
    schema = header.get("schema")
    tensors = dict(W_enc_SD=state["W_enc"].T.contiguous(), b_enc_S=state["b_enc"], W_dec_SD=state["W_dec"], b_dec_D=state["b_dec"])
    if schema is None:
        # saev 0.1.0 (PyPI): config fields at the top level, SparseAutoencoder = ReLU(W_enc (x − b_dec) + b_enc).
        if "d_vit" not in header:
            raise CheckpointError(f"{file}: a header without 'schema' should be saev 0.1.0's (d_vit, exp_factor, ...), got {sorted(header)}")
        peer = {"library": "saev", "library_version": "0.1.0 (no schema)", "architecture": "relu", "config": header}
        return _Parts("relu", b_dec_in_encoder=True, peer=peer, **tensors)
    if schema == 1:
        raise CheckpointError(f"{file} has saev schema 1: saev moved b_dec in and out of the encoder while writing "
                              "schema 1, so the file does not say which encoder it needs. Load it with saev and re-save "
                              "it (saev.nn.dump writes schema 5), then load that")
    if schema not in SAEV_SCHEMAS:
        raise CheckpointError(f"{file} has saev schema {schema!r}; nacosae reads no schema (saev 0.1.0) and schemas "
                              f"{SAEV_SCHEMAS}. A newer saev may have changed the encoder: check it, then extend nacosae.interop")
    cfg = header.get("cfg", {})
    act = cfg.get("activation")
    if not (isinstance(act, dict) and "cls" in act):
        raise CheckpointError(f"{file}: schema {schema} header has no activation {{cls, params}} in cfg (got {act!r})")
    cls, params = act["cls"], act.get("params", {})
    peer = {"library": "saev", "library_version": header.get("lib"), "schema": schema, "architecture": cls, "config": cfg}
    if cls == "Relu":
        return _Parts("relu", b_dec_in_encoder=False, peer=peer, **tensors)
    if cls == "TopK":
        return _Parts("topk_signed", k=int(params.get("top_k", 32)), b_dec_in_encoder=False, peer=peer, **tensors)
    if cls == "BatchTopK":
        if "activation.threshold" not in state:
            raise CheckpointError(f"{file}: this saev BatchTopK checkpoint (schema {schema}) has no inference threshold, so "
                                  "its codes depend on the batch; nacosae refuses it. Re-train with saev ≥ schema 4")
        # saev: pre > θ kept as is; θ ≤ 0 means pre > 0. nacosae batchtopk keeps pre > θ with θ ≥ 0: the same.
        theta = state["activation.threshold"].reshape(()).clamp_min(0.0)
        return _Parts("batchtopk", k=int(params.get("top_k", 32)), threshold=theta, b_dec_in_encoder=False, peer=peer, **tensors)
    raise CheckpointError(f"{file}: saev activation {cls!r} is not one nacosae reads (Relu, TopK, BatchTopK)")


# ---------------------------------------------------------------------------------------------------------------- SAELens


def _read_sae_lens(path: Path) -> _Parts:
    folder = path.parent if path.is_file() else path
    cfg = _json(folder / "cfg.json")
    state = _safetensors(folder / "sae_weights.safetensors")
    meta = cfg.get("metadata") or {}
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    major = _major(version)
    if major is not None and major > 6:
        raise CheckpointError(f"{folder} was written by SAELens {version}; nacosae reads the SAELens ≤ 6.x layout. "
                              "Check what changed, then extend nacosae.interop")
    if major is None or major < 6:
        cfg = _sae_lens_pre6(cfg)  # as SAELens's handle_pre_6_0_config maps old configs
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in _SAE_LENS_RUNTIME_NORMS:
        raise CheckpointError(f"{folder}: normalize_activations={norm!r} normalises each input inside SAELens's encode; "
                              f"nacosae's SAE has one fixed input scale and reads {_SAE_LENS_RUNTIME_NORMS} only")
    if cfg.get("reshape_activations", "none") not in ("none", None) or str(meta.get("hook_name") or cfg.get("hook_name") or "").endswith("hook_z"):
        raise CheckpointError(f"{folder}: hook_z (attention-head) SAEs are not vision-layer SAEs nacosae reads")
    if cfg.get("finetuning_scaling_factor") or "scaling_factor" in state:
        raise CheckpointError(f"{folder}: SAELens's finetuning scaling factor is not read by nacosae")
    _need(state, ("W_enc", "W_dec", "b_dec"), str(folder / "sae_weights.safetensors"))
    W_enc_SD, W_dec_SD = state["W_enc"].T.contiguous(), state["W_dec"]
    S = W_dec_SD.shape[0]
    b_enc_S = state.get("b_enc", torch.zeros(S))
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    peer = {"library": "sae_lens", "library_version": version, "architecture": arch, "config": cfg}
    prov = {k: v for k, v in (("backbone", meta.get("model_name") or cfg.get("model_name")),
                              ("layer", meta.get("hook_name") or cfg.get("hook_name"))) if v}
    common = dict(b_dec_in_encoder=apply_b_dec, peer=peer, provenance=prov)

    if arch == "standard":
        return _Parts("relu", W_enc_SD, b_enc_S, W_dec_SD, state["b_dec"], **common)
    if arch in ("topk", "batchtopk"):
        rescale = bool(cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk"))
        norms_S = W_dec_SD.norm(dim=-1)
        if rescale:
            # SAELens's own fold (process_state_dict_for_saving_inference): the topk sees pre · ‖W_dec,s‖.
            W_enc_SD, b_enc_S, W_dec_SD = W_enc_SD * norms_S[:, None], b_enc_S * norms_S, W_dec_SD / norms_S[:, None]
        if arch == "topk":
            return _Parts("topk", W_enc_SD, b_enc_S, W_dec_SD, state["b_dec"], k=int(cfg["k"]), **common)
        # A BatchTopK *training* checkpoint: SAELens's inference form is JumpReLU with θ = topk_threshold everywhere.
        _need(state, ("topk_threshold",), str(folder / "sae_weights.safetensors"))
        theta_S = torch.full((S,), float(state["topk_threshold"].double()))
        return _Parts("jumprelu", W_enc_SD, b_enc_S, W_dec_SD, state["b_dec"], threshold=theta_S, **common)
    if arch == "jumprelu":
        if "threshold" in state:
            theta_S = state["threshold"]
        elif "log_threshold" in state:
            theta_S = state["log_threshold"].exp()
        else:
            raise CheckpointError(f"{folder}: a jumprelu SAE without threshold or log_threshold")
        return _Parts("jumprelu", W_enc_SD, b_enc_S, W_dec_SD, state["b_dec"], threshold=theta_S.reshape(S), **common)
    raise CheckpointError(f"{folder}: SAELens architecture {arch!r} is not one nacosae reads "
                          "(standard, topk, jumprelu, batchtopk)")


def _sae_lens_pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    renames = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    if "architecture" not in new:
        kwargs = new.get("activation_fn_kwargs") or {}
        if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            new["architecture"], new["k"] = "topk", kwargs["k"]
        elif new.get("activation_fn", "relu") == "relu":
            new["architecture"] = "standard"
        else:
            raise CheckpointError(f"SAELens pre-6.0 activation_fn {new.get('activation_fn')!r} is not one nacosae reads")
    return new


def _major(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------- sparsify


def _read_sparsify(path: Path) -> _Parts:
    folder = path.parent if path.is_file() else path
    cfg = _json(folder / "cfg.json")
    state = _safetensors(folder / "sae.safetensors")
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in state:
        raise CheckpointError(f"{folder}: a sparsify transcoder / skip connection is not an autoencoder nacosae reads")
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(f"{folder}: sparsify activation {cfg.get('activation')!r}; nacosae reads 'topk' only")
    if cfg.get("signed"):
        raise CheckpointError(f"{folder}: a 'signed' sparse coder (old EleutherAI sae) is not read by nacosae")
    _need(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), str(folder / "sae.safetensors"))
    prov: dict[str, Any] = {"layer": folder.name}
    run_cfg = folder.parent / "config.json"  # sparsify's trainer writes the run's config beside the hookpoint folders
    if run_cfg.is_file():
        run = _json(run_cfg)
        if run.get("model"):
            prov["backbone"] = run["model"]
    peer = {"library": "sparsify", "library_version": None, "architecture": "topk", "config": cfg}
    # sparsify: topk of relu(W (x − b_dec) + b): the same dense code as topk then ReLU.
    return _Parts("topk", state["encoder.weight"], state["encoder.bias"], state["W_dec"], state["b_dec"],
                  k=int(cfg.get("k", 32)), b_dec_in_encoder=True, peer=peer, provenance=prov)


# ---------------------------------------------------------------------------------------------------------------- dictionary_learning


def _read_dictionary_learning(path: Path) -> _Parts:
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() else folder / "ae.pt"
    state = _torch_load_weights(weights, str(weights))
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    trainer = config.get("trainer", {})
    dict_class = trainer.get("dict_class") or _dictionary_learning_class(state, weights)
    prov = {k: v for k, v in (("backbone", trainer.get("lm_name")),
                              ("layer", trainer.get("submodule_name") or trainer.get("layer"))) if v is not None}
    peer = {"library": "dictionary_learning", "library_version": config.get("dictionary_learning_version"),
            "architecture": dict_class, "config": config}
    common = dict(peer=peer, provenance=prov)
    if dict_class == "AutoEncoder":
        _need(state, ("bias", "encoder.weight", "encoder.bias", "decoder.weight"), str(weights))
        W_enc_SD, b_enc_S, W_dec_SD = state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T.contiguous()
        # AutoEncoder.from_pretrained(normalize_decoder=True), its default: unit decoder columns, codes rescaled.
        norms_S = W_dec_SD.norm(dim=1)
        if not torch.allclose(norms_S, torch.ones_like(norms_S)):
            W_dec_SD, W_enc_SD, b_enc_S = W_dec_SD / norms_S[:, None], W_enc_SD * norms_S[:, None], b_enc_S * norms_S
        return _Parts("relu", W_enc_SD, b_enc_S, W_dec_SD, state["bias"], b_dec_in_encoder=True, **common)
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        _need(state, ("k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), str(weights))
        tensors = (state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T.contiguous(), state["b_dec"])
        k = int(state["k"])
        if dict_class == "AutoEncoderTopK":  # its encode defaults to use_threshold=False: the per-input top k
            return _Parts("topk", *tensors, k=k, b_dec_in_encoder=True, **common)
        theta = state["threshold"].reshape(()).float()
        if theta < 0:  # never estimated: relu(pre) · (relu(pre) > −1) is plain ReLU
            return _Parts("relu", *tensors, b_dec_in_encoder=True, **common)
        return _Parts("batchtopk", *tensors, k=k, threshold=theta, b_dec_in_encoder=True, **common)
    if dict_class == "JumpReluAutoEncoder":
        _need(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), str(weights))
        # JumpReluAutoEncoder.from_pretrained leaves apply_b_dec_to_input=False: W x + b, then relu where pre > θ.
        return _Parts("jumprelu", state["W_enc"].T.contiguous(), state["b_enc"], state["W_dec"], state["b_dec"],
                      threshold=state["threshold"], b_dec_in_encoder=False, **common)
    raise CheckpointError(f"{weights}: dictionary_learning class {dict_class!r} is not one nacosae reads "
                          "(AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder)")


def _dictionary_learning_class(state: dict[str, Tensor], weights: Path) -> str:
    keys = set(state)
    if "W_enc" in keys and "threshold" in keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys and "decoder.weight" in keys:
        return "AutoEncoder"
    if "k" in keys:
        raise CheckpointError(f"{weights} could be AutoEncoderTopK or BatchTopKSAE and has no config.json "
                              "(trainer.dict_class) beside it to say which")
    raise CheckpointError(f"{weights}: no config.json and tensors {sorted(keys)} match no dictionary_learning class")


# ---------------------------------------------------------------------------------------------------------------- Overcomplete


def _read_overcomplete(path: Path, sae_class: str | None = None, top_k: int | None = None) -> _Parts:
    if path.is_dir():
        pts = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
        if len(pts) != 1:
            raise FileNotFoundError(f"{path}: expected one Overcomplete state_dict .pt, found {[p.name for p in pts]}")
        path = pts[0]
    state = _torch_load_weights(path, str(path))
    if sae_class is None:
        sae_class = "JumpSAE" if "thresholds" in state else None
    if sae_class not in ("SAE", "TopKSAE", "JumpSAE"):
        hint = ("BatchTopKSAE keeps its running threshold outside the state_dict, so its codes cannot be rebuilt"
                if sae_class == "BatchTopKSAE" else "Overcomplete saves no config: say which class wrote the state_dict")
        raise ValueError(f"{path}: {hint}; pass sae_class='SAE' | 'TopKSAE' | 'JumpSAE' (and top_k= for TopKSAE)")
    if "encoder.final_block.0.weight" in state:  # the default 'linear' encoder: Linear + Identity norm + ReLU
        W_enc_SD, b_enc_S = state["encoder.final_block.0.weight"], state.get("encoder.final_block.0.bias")
        other = [k for k in state if k.startswith("encoder.") and not k.startswith("encoder.final_block.0.")]
    elif "encoder.weight" in state:  # a TieableEncoder, untied
        W_enc_SD, b_enc_S = state["encoder.weight"], state.get("encoder.bias")
        other = [k for k in state if k.startswith("encoder.") and k not in ("encoder.weight", "encoder.bias")]
    elif not any(k.startswith("encoder.") for k in state):  # a tied TieableEncoder: W_enc = the dictionary
        W_enc_SD, b_enc_S, other = None, None, []
    else:
        raise CheckpointError(f"{path}: the encoder {sorted(k for k in state if k.startswith('encoder.'))} is not a "
                              "single linear layer (MLP, attention and ResNet encoders are not SAEs nacosae reads)")
    if other:
        raise CheckpointError(f"{path}: encoder layers {other} beyond one linear layer (normalisation, MLP blocks) "
                              "are not read by nacosae")
    _need(state, ("dictionary._weights",), str(path))
    atoms_SD = state["dictionary._weights"]
    # Eval mode fuses the dictionary: normalize_l2 (x / (‖x‖ + 1e-8)) times exp(multiplier), the default
    # DictionaryLayer(normalization="l2"); the tied encoder reads that same fused dictionary.
    multiplier = state.get("dictionary.multiplier", torch.zeros(())).reshape(())
    W_dec_SD = atoms_SD / (atoms_SD.norm(dim=1, keepdim=True) + 1e-8) * multiplier.exp()
    S, D = W_dec_SD.shape
    W_enc_SD = W_dec_SD if W_enc_SD is None else W_enc_SD
    b_enc_S = torch.zeros(S) if b_enc_S is None else b_enc_S
    peer = {"library": "overcomplete", "library_version": None, "architecture": sae_class,
            "config": {"sae_class": sae_class, "top_k": top_k}}
    common = dict(b_dec_in_encoder=True, peer=peer)
    zeros_D = torch.zeros(D)  # Overcomplete decodes z @ D, no bias; encodes x without centring
    if sae_class == "SAE":
        return _Parts("relu", W_enc_SD, b_enc_S, W_dec_SD, zeros_D, **common)
    if sae_class == "TopKSAE":
        if top_k is None:
            raise ValueError(f"{path}: an Overcomplete TopKSAE needs top_k= (not in its state_dict)")
        return _Parts("topk", W_enc_SD, b_enc_S, W_dec_SD, zeros_D, k=int(top_k), **common)
    _need(state, ("thresholds",), str(path))
    # JumpSAE: relu(pre), zeroed where below exp(thresholds) (kept at equality; measure zero in float).
    return _Parts("jumprelu", W_enc_SD, b_enc_S, W_dec_SD, zeros_D, threshold=state["thresholds"].exp(), **common)


# ---------------------------------------------------------------------------------------------------------------- export


def export_sae_lens(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write `sae` as SAELens's `cfg.json` + `sae_weights.safetensors` (atomically), loadable with
    `sae_lens.SAE.load_from_disk(folder)` and so by SAEDashboard and tools built on SAELens.

    nacosae's input scale s is folded in (SAELens applies no scale when it loads from disk): W_enc/s, b_dec·s,
    W_dec·s, so SAELens's codes equal nacosae's and its reconstruction nacosae's x̂. topk → 'topk'; relu →
    'standard'; batchtopk (θ) and jumprelu (θ_s) → 'jumprelu' (relu(pre) · (pre > θ), SAELens's own form for
    BatchTopK). topk_signed has no SAELens architecture: ValueError. metadata carries model_name/hook_name from the
    provenance and the whole nacosae provenance under `nacosae_provenance`.
    """
    from nacosae import __version__
    from nacosae.io import atomic_save_safetensors, atomic_write_json

    cfg = sae.cfg
    arch = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}.get(cfg.activation)
    if arch is None:
        raise ValueError(f"activation {cfg.activation!r} has no SAELens architecture (SAELens's TopK applies a ReLU)")
    s = float(cfg.input_scale)
    with torch.no_grad():
        S = cfg.d_sae
        tensors = {"W_enc": (sae.W_enc.detach().float().cpu() / s).T.contiguous(),
                   "b_enc": sae.b_enc.detach().float().cpu().clone(),
                   "W_dec": sae.W_dec.detach().float().cpu() * s,
                   "b_dec": sae.b_dec.detach().float().cpu() * s}
        if cfg.activation == "batchtopk":
            if float(sae.threshold) < 0:
                raise ValueError("this BatchTopK SAE has no inference threshold yet: train it first")
            tensors["threshold"] = torch.full((S,), float(sae.threshold))
        elif cfg.activation == "jumprelu":
            tensors["threshold"] = sae.threshold.detach().float().cpu().clone().reshape(S)
    prov = cfg.provenance
    out = {"d_in": cfg.d_in, "d_sae": S, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"sae_lens_version": SAE_LENS_FORMAT_VERSION, "sae_lens_training_version": None,
                        "model_name": prov.get("backbone"), "hook_name": prov.get("layer"),
                        "written_by": f"nacosae {__version__}", "nacosae_activation": cfg.activation,
                        "nacosae_provenance": prov}}
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "sae_weights.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(folder / "cfg.json", out)
    return folder
