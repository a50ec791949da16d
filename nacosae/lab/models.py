"""Small classifiers for 28×28 grey images, written so that every place worth inspecting is a named module.

Activation functions are modules (`nn.ReLU`), not `F.relu` calls, so a forward hook on `act1` sees the post-ReLU
units and the traced graph names the same modules the hooks use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

MODEL_KINDS = ("cnn", "mlp", "vit")


@dataclass(frozen=True)
class ModelConfig:
    """Which small network and how wide."""

    kind: str = "cnn"
    """'cnn' (2 conv blocks + 2 linear), 'mlp' (2 hidden layers) or 'vit' (patch-7 ViT, 2 blocks)."""
    width: int = 16
    """Channels of the first conv (the second has 2×); MLP: hidden units / 2 of the first layer; ViT: token width."""
    hidden: int = 64
    """Units of the penultimate (fully connected) layer, the layer the lab analyses by default."""
    dropout: float = 0.0
    """Dropout before the classifier (the 'L2 + dropout' baseline uses it); 0 disables it."""
    n_classes: int = 10
    """Output classes."""

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.width < 1 or self.hidden < 1 or self.n_classes < 2:
            raise ValueError(f"width, hidden must be ≥ 1 and n_classes ≥ 2, got {self.width}, {self.hidden}, {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SmallCNN(nn.Module):
    """conv(1→w) → ReLU → pool → conv(w→2w) → ReLU → pool → flatten → fc1(→hidden) → ReLU → [dropout] → fc2(→10)."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * w * 7 * 7, cfg.hidden)
        self.act3 = nn.ReLU()
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x_B1HW: Tensor) -> Tensor:
        h = self.pool1(self.act1(self.conv1(x_B1HW)))  # (B, w, 14, 14)
        h = self.pool2(self.act2(self.conv2(h)))  # (B, 2w, 7, 7)
        h = self.act3(self.fc1(self.flatten(h)))  # (B, hidden)
        return self.fc2(self.drop(h))  # (B, n_classes)


class SmallMLP(nn.Module):
    """flatten → fc1(784→2·width·4) → ReLU → fc2(→hidden) → ReLU → [dropout] → fc3(→10)."""

    def __init__(self, cfg: ModelConfig = ModelConfig(kind="mlp")):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(28 * 28, 8 * cfg.width)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(8 * cfg.width, cfg.hidden)
        self.act2 = nn.ReLU()
        self.drop = nn.Dropout(cfg.dropout)
        self.fc3 = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x_B1HW: Tensor) -> Tensor:
        h = self.act1(self.fc1(self.flatten(x_B1HW)))
        h = self.act2(self.fc2(h))  # (B, hidden): the penultimate layer
        return self.fc3(self.drop(h))

    def embed(self, x_B1HW: Tensor) -> Tensor:
        """(B, hidden) penultimate features (used as the 'other encoder' for the Monosemanticity Score)."""
        return self.act2(self.fc2(self.act1(self.fc1(self.flatten(x_B1HW)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, n_heads: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, 2 * dim)
        self.mlp_act = nn.GELU()
        self.mlp_out = nn.Linear(2 * dim, dim)

    def forward(self, x_BTD: Tensor) -> Tensor:
        h_BTD = self.ln1(x_BTD)
        x_BTD = x_BTD + self.attn(h_BTD, h_BTD, h_BTD, need_weights=False)[0]
        return x_BTD + self.mlp_out(self.mlp_act(self.mlp_in(self.ln2(x_BTD))))


class SmallViT(nn.Module):
    """7×7 patches (16 tokens) + CLS, learned positions, 2 blocks, CLS → LayerNorm → fc(→hidden) → ReLU → head."""

    def __init__(self, cfg: ModelConfig = ModelConfig(kind="vit", width=32)):
        super().__init__()
        d = cfg.width
        self.patch = nn.Conv2d(1, d, 7, stride=7)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x_B1HW: Tensor) -> Tensor:
        p_BDT = self.patch(x_B1HW).flatten(2)  # (B, d, 16)
        x_BTD = torch.cat([self.cls.expand(x_B1HW.shape[0], -1, -1), p_BDT.transpose(1, 2)], dim=1) + self.pos
        x_BTD = self.blocks(x_BTD)
        h_BD = self.act(self.fc1(self.ln(x_BTD[:, 0])))
        return self.head(self.drop(h_BD))


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg.kind` (seed torch yourself for reproducible weights)."""
    return {"cnn": SmallCNN, "mlp": SmallMLP, "vit": SmallViT}[cfg.kind](cfg)


def penultimate_layer(cfg: ModelConfig) -> str:
    """Module name whose output is the (post-ReLU) penultimate layer of a model built from `cfg`."""
    return {"cnn": "act3", "mlp": "act2", "vit": "act"}[cfg.kind]
