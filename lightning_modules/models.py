"""Architecture registry: family name -> builder. A new family (CNN, ResNet) is one more entry."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_modules.mlp import MLP


@dataclass(frozen=True)
class Architecture:
    family: str
    hidden: tuple[int, ...]  # one width per hidden layer
    dropout: float


def build_mlp(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return MLP(math.prod(in_shape), arch.hidden, n_classes, arch.dropout)


BUILDERS: dict[str, Callable[[Architecture, Sequence[int], int], nn.Module]] = {"mlp": build_mlp}


def build_model(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return BUILDERS[arch.family](arch, in_shape, n_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
