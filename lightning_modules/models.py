"""Architecture registry: family name -> builder."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_modules.cnn import CNN, ResNet
from lightning_modules.mlp import MLP


@dataclass(frozen=True)
class Architecture:
    family: str  # mlp | cnn | resnet
    # mlp: units per hidden layer; cnn: channels per conv block; resnet: channels per stage
    hidden: tuple[int, ...]
    dropout: float
    kernel: int = 3  # cnn
    batch_norm: bool = True  # cnn (resnet always has it)
    blocks: int = 1  # resnet: basic blocks per stage


def build_mlp(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return MLP(math.prod(in_shape), arch.hidden, n_classes, arch.dropout)


def build_cnn(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return CNN(in_shape, arch.hidden, n_classes, arch.kernel, arch.dropout, arch.batch_norm)


def build_resnet(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return ResNet(in_shape, arch.hidden, arch.blocks, n_classes, arch.dropout)


BUILDERS: dict[str, Callable[[Architecture, Sequence[int], int], nn.Module]] = {
    "mlp": build_mlp, "cnn": build_cnn, "resnet": build_resnet}


def build_model(arch: Architecture, in_shape: Sequence[int], n_classes: int) -> nn.Module:
    return BUILDERS[arch.family](arch, in_shape, n_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
