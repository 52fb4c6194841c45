"""Convolutional families for 28x28 images: a plain CNN and a small ResNet."""

from collections.abc import Sequence

from torch import nn

from lightning_modules.dropout import FastDropout


def conv_bn_relu(c_in: int, c_out: int, kernel: int, batch_norm: bool,
                 stride: int = 1) -> list[nn.Module]:
    # With batch norm right after, the conv's bias would be redundant.
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=not batch_norm),
            *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """[conv -> BN -> ReLU] per block with `channels[i]` filters; a 2x2 max-pool after every
    second block and after the last (at most 3: 28 -> 14 -> 7 -> 3); then flatten -> dropout ->
    linear."""

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], n_classes: int,
                 kernel: int = 3, dropout: float = 0.0, batch_norm: bool = True):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        pools = 0
        for i, c_out in enumerate(channels):
            layers += conv_bn_relu(c, c_out, kernel, batch_norm)
            c = c_out
            if (i % 2 == 1 or i == len(channels) - 1) and pools < 3 and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w, pools = h // 2, w // 2, pools + 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), FastDropout(dropout), nn.Linear(c * h * w,
                                                                              n_classes))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 conv when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(c_in, c_out, 3, True, stride),
                                  nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """Stem conv3x3 -> stages of `blocks` BasicBlocks with `widths[s]` channels (stride 2 at the
    start of every stage after the first: 28 -> 14 -> 7) -> global average pool -> dropout ->
    linear."""

    def __init__(self, in_shape: Sequence[int], widths: Sequence[int], blocks: int,
                 n_classes: int, dropout: float = 0.0):
        super().__init__()
        c = widths[0]
        layers: list[nn.Module] = conv_bn_relu(in_shape[0], c, 3, True)
        for s, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(c, width, 2 if s > 0 and b == 0 else 1))
                c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), FastDropout(dropout),
                                  nn.Linear(c, n_classes))

    def forward(self, x):
        return self.head(self.features(x))
