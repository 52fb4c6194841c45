from collections.abc import Sequence

from torch import nn

from lightning_modules.dropout import FastDropout


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden layer -> Linear (logits)."""

    def __init__(self, in_features: int, hidden: Sequence[int], n_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            if dropout > 0:
                layers.append(FastDropout(dropout))
            prev = width
        layers.append(nn.Linear(prev, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
