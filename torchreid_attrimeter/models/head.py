"""The interpreter's own layers: the attribute decomposition head, the positive map activation and
the optional attribute-recognition branch (docs/method.md §3-4)."""

from __future__ import annotations

import torch
from torch import nn


def positive_map(logits: torch.Tensor) -> torch.Tensor:
    """exp(z) for z < 0, sqrt(1 + z) for z >= 0: positive, monotone, continuous at 0 (both give 1).

    Each branch only sees its own half of z, so the unused branch can neither overflow (exp of a
    large z) nor produce NaN gradients (sqrt of 1 + a very negative z).
    """
    is_negative = logits < 0
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    negative_part = torch.exp(torch.where(is_negative, logits, zero))
    positive_part = torch.sqrt(1.0 + torch.where(is_negative, zero, logits))
    return torch.where(is_negative, negative_part, positive_part)


class PositiveMap(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return positive_map(logits)


class AttributeDecompositionHead(nn.Module):
    """conv 3x3 (C -> hidden, no bias) then conv 1x1 (hidden -> M, no bias), nothing in between,
    then the positive map: features (B, C, h, w) -> maps (B, M, h, w)."""

    def __init__(self, in_channels: int, num_attributes: int, hidden_channels: int = 256):
        super().__init__()
        self.hidden = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1, bias=False)
        self.attribute_logits = nn.Conv2d(hidden_channels, num_attributes, kernel_size=1, bias=False)
        self.activation = PositiveMap()
        nn.init.kaiming_normal_(self.hidden.weight, mode="fan_out", nonlinearity="relu")
        # Small last layer: every map starts close to 1, so each attribute embedding starts at the
        # target's own embedding and training moves away from an honest, uniform decomposition.
        nn.init.normal_(self.attribute_logits.weight, std=1e-3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activation(self.attribute_logits(self.hidden(features)))


class AttributeRecognitionBranch(nn.Module):
    """Pooled interpreter features (B, C, h, w) -> attribute logits (B, M), trained with the
    frequency-weighted BCE (docs/method.md §4)."""

    def __init__(self, in_channels: int, num_attributes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_attributes)
        nn.init.normal_(self.classifier.weight, std=1e-3)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features).flatten(1))
