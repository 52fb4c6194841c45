"""Population training: N networks of one shape trained together as one batched computation.

Member i has its own weights (stacked along dim 0), learning rate, weight decay, dropout, label
smoothing, augmentation strength, seed, batch order and dropout masks; members never interact
(the loss is a sum of per-member losses). MLPs: N small matmuls fused into one `bmm` per layer.
CNNs: the N members' channels side by side, [B, N*C, H, W], each convolution a grouped
convolution with N groups (what `torch.func.vmap` makes of a convolution too; about even with
vmap on the CPU, scripts/bench_grouped_conv.py), batch norm per channel = per member.
That is what fills a GPU that one small network leaves idle.

On CPU an MLP member reproduces the solo trial (`Classifier` + `MLP`, same seed) op for op: the
same initial weights, batch order, dropout masks (its own generator, continuing from the state
the solo run has after building its net), augmentation draws and Adam/SGD arithmetic (to float
rounding where the population is large enough for the fused update, population_optim.py). A CNN
member does too except for the convolution kernels (grouped vs single), which round
differently: its metrics agree with the solo trial's to ~1e-3 after an epoch, not bit for bit.
On GPU the dropout masks come from one batched draw (one kernel instead of N), so members are
reproducible but not mask-identical to solo runs.
"""

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import dropout
from lightning_modules.augment import BatchAugment, strengths, warp_members
from lightning_modules.cnn import CNN
from lightning_modules.metrics import GAP, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS
from lightning_modules.mlp import MLP
from lightning_modules.population_optim import StackedOptimizer
from lightning_modules.schedules import lr_factor


class Members(nn.Module):
    """What every population model holds per member besides its weights: its dropout rate and
    (on CPU) its own dropout generator."""

    def __init__(self, dropouts: Sequence[float]):
        super().__init__()
        self.p: torch.Tensor
        self.register_buffer("p", torch.tensor(list(dropouts), dtype=torch.float32))
        self.dropouts = list(dropouts)
        # CPU: one generator per member (exact solo masks); set by the caller. GPU: one draw.
        self.generators: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.dropouts)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        return member_dropout(h, self.dropouts, self.p, self.generators)

    def _keep_members(self, idx: list[int]) -> torch.Tensor:
        """Keep the per-member values of `idx`; returns them as an index tensor for the
        subclass's weights."""
        sel = torch.tensor(idx, device=self.p.device)
        self.p = self.p[sel]
        self.dropouts = [self.dropouts[i] for i in idx]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in idx]
        return sel


class PopulationMLP(Members):
    """Weights of N MLPs of one shape, layer l stacked as [N, out, in] and [N, out]."""

    def __init__(self, nets: Sequence[MLP], dropouts: Sequence[float]):
        super().__init__(dropouts)
        linears = [[m for m in net.net if isinstance(m, nn.Linear)] for net in nets]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].weight.detach() for ls in linears]))
            for j in range(len(linears[0])))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].bias.detach() for ls in linears]))
            for j in range(len(linears[0])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, B, ...], one batch per member -> logits [N, B, classes]."""
        return self._layers(x.reshape(x.shape[0], x.shape[1], -1))

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ...], the same batch for every member (evaluation) -> [N, B, classes]."""
        return self._layers(x.reshape(1, x.shape[0], -1).expand(len(self), -1, -1))

    def _layers(self, h: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if j < last:
                h = F.relu(h)
                if self.training:
                    h = self._dropout(h)
        return h

    def keep(self, idx: list[int]) -> None:
        """Drop every member not in `idx` (pruned or diverged): later steps cost less."""
        sel = self._keep_members(idx)
        for plist in (self.weights, self.biases):
            for j, prm in enumerate(plist):
                plist[j] = nn.Parameter(prm.detach()[sel])

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights under the keys of `MLP.state_dict()`."""
        out: dict[str, torch.Tensor] = {}
        layer = 1  # net.0 is Flatten; each hidden layer is Linear, ReLU[, Dropout]
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"net.{layer}.weight"], out[f"net.{layer}.bias"] = w[i].detach(), b[i].detach()
            if j < len(self.weights) - 1:
                layer += 3 if self.dropouts[i] > 0 else 2
        return out


def member_dropout(h: torch.Tensor, dropouts: list[float], p: torch.Tensor,
                   generators: list[torch.Generator] | None) -> torch.Tensor:
    """h: [N, B, F], member i dropped with dropouts[i]."""
    if generators is not None:  # CPU: member i's masks exactly as FastDropout draws
        masks = [dropout.mask(h.shape[1:], q, generators[i], h.dtype) if q > 0
                 else torch.ones_like(h[i]) for i, q in enumerate(dropouts)]
        return h * torch.stack(masks)
    keep = 1 - p.view(-1, 1, 1)
    return h * ((torch.rand_like(h) < keep) / keep)


class PopulationCNN(Members):
    """N `CNN`s of one shape. Every tensor of the solo net's state_dict is stacked along a new
    dim 0 (weights and biases as parameters, batch-norm statistics as buffers), under the solo
    key with dots as "__"; the forward pass follows the solo net's module list."""

    def __init__(self, nets: Sequence[CNN], dropouts: Sequence[float]):
        super().__init__(dropouts)
        first = nets[0]
        param_keys = {k for k, _ in first.named_parameters()}
        states = [net.state_dict() for net in nets]
        self.keys = list(states[0])
        for key in self.keys:
            stacked = torch.stack([st[key].detach() for st in states])
            if key in param_keys:
                self.register_parameter(_name(key), nn.Parameter(stacked))
            else:
                self.register_buffer(_name(key), stacked.clone())
        # The solo net's layers as (state_dict prefix, module): what forward runs. A plain list:
        # the modules' own tensors are not used, only their settings (stride, eps, ...).
        self.plan = [(f"features.{i}", m) for i, m in enumerate(first.features)]
        linear = next(i for i, m in enumerate(first.head) if isinstance(m, nn.Linear))
        self.head_key = f"head.{linear}"

    def _t(self, key: str) -> torch.Tensor:
        return getattr(self, _name(key))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, B, C, H, W], one batch per member -> logits [N, B, classes]."""
        n, b = x.shape[:2]
        return self._layers(x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:]), False)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], the same batch for every member (evaluation) -> [N, B, classes]."""
        return self._layers(x, True)

    def _layers(self, h: torch.Tensor, shared: bool) -> torch.Tensor:
        n = len(self)
        for key, m in self.plan:
            if isinstance(m, nn.Conv2d):
                w = self._t(f"{key}.weight")
                bias = self._t(f"{key}.bias").reshape(-1) if m.bias is not None else None
                # A shared input (evaluation, first layer) is one input for all N members: one
                # ordinary convolution with N * C_out filters.
                groups = 1 if shared else n
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias, m.stride, m.padding,
                             groups=groups)
                shared = False
            elif isinstance(m, nn.BatchNorm2d):
                assert m.momentum is not None
                # Views of the [N, C] buffers: batch norm updates the running statistics in place.
                h = F.batch_norm(h, self._t(f"{key}.running_mean").view(-1),
                                 self._t(f"{key}.running_var").view(-1),
                                 self._t(f"{key}.weight").view(-1),
                                 self._t(f"{key}.bias").view(-1), self.training, m.momentum,
                                 m.eps)
                if self.training:
                    self._t(f"{key}.num_batches_tracked").add_(1)
            elif isinstance(m, nn.ReLU):
                h = F.relu(h)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding)
            else:
                raise ValueError(f"population: no batched form of {type(m).__name__}")
        if shared:  # no layer ran (cannot happen for a CNN); keep the contract
            h = h.repeat(1, n, 1, 1)
        h = h.reshape(h.shape[0], n, -1).transpose(0, 1)  # [N, B, C*H*W]: the solo flatten
        if self.training:
            h = self._dropout(h)
        w, bias = self._t(f"{self.head_key}.weight"), self._t(f"{self.head_key}.bias")
        return torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))

    def keep(self, idx: list[int]) -> None:
        sel = self._keep_members(idx)
        for key in self.keys:
            t = self._t(key)
            if isinstance(t, nn.Parameter):
                setattr(self, _name(key), nn.Parameter(t.detach()[sel]))
            else:
                setattr(self, _name(key), t[sel])

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's tensors under the keys of `CNN.state_dict()`."""
        return {key: self._t(key)[i].detach().clone() for key in self.keys}


def _name(key: str) -> str:
    return key.replace(".", "__")


PopulationNet = PopulationMLP | PopulationCNN


class PopulationClassifier(pl.LightningModule):
    """The population's LightningModule: `Classifier`'s loop (groups of mini-batches, one
    optimizer step each; evaluation on the validation set and a train subset, dropout off)
    with every quantity carrying a leading member dimension. `history[i]` is member i's
    per-epoch metrics under the same names as a solo trial's."""

    def __init__(self, net: PopulationNet, optimizer: str, lrs: Sequence[float],
                 weight_decays: Sequence[float], lr_schedule: str = "constant",
                 total_steps: int = 0, label_smoothings: Sequence[float] | None = None,
                 augments: Sequence[BatchAugment] | None = None):
        super().__init__()
        self.net = net
        self.label_smoothings = list(label_smoothings or [0.0] * len(net))
        self.augments = list(augments) if augments else None
        # Per-member values as device tensors, made on first use and again after stop().
        self._strength: torch.Tensor | None = None
        self._eps: torch.Tensor | None = None
        self.optimizer_name = optimizer
        self.lrs, self.weight_decays = list(lrs), list(weight_decays)
        self.lr_schedule, self.total_steps, self.steps_done = lr_schedule, total_steps, 0
        self.automatic_optimization = False
        self.opt: StackedOptimizer | None = None
        self.fused: bool | None = None  # the optimizer's: None decides by size (population_optim)
        self.active = list(range(len(net)))  # original member index of each row still training
        self.history: list[list[dict[str, float]]] = [[] for _ in range(len(net))]
        self._sums = torch.zeros(2, len(net), 3)

    def on_fit_start(self) -> None:
        self.opt = StackedOptimizer(self.optimizer_name, self.lrs, self.weight_decays,
                                    self.device, fused=self.fused)

    def configure_optimizers(self):
        return None  # StackedOptimizer: per-member lr and weight decay; made in on_fit_start

    def training_step(self, batch, batch_idx):
        assert self.opt is not None
        for x, y in batch:  # x: [N, B, ...], y: [N, B]
            factor = lr_factor(self.lr_schedule, self.steps_done / max(self.total_steps, 1))
            if self.augments is not None:
                if self._strength is None:
                    self._strength = strengths(self.augments, x)
                x = warp_members(self.augments, x, self._strength)
            logits = self.net(x)
            # Sum of per-member mean losses: each member's gradient is its own loss's.
            self.manual_backward(self._loss(logits, y).sum())
            self.opt.step(list(self.net.parameters()), factor)
            self.steps_done += 1

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy [N], with its own label smoothing."""
        n, b = y.shape
        flat, target = logits.reshape(n * b, -1), y.reshape(-1)
        eps = self.label_smoothings
        if len(set(eps)) == 1:  # the solo trial's own call: identical arithmetic
            return F.cross_entropy(flat, target, reduction="none",
                                   label_smoothing=eps[0]).view(n, b).mean(1)
        # torch's formula, (1 - e) * NLL + e * mean over classes of -log p, with e per member
        logp = F.log_softmax(flat, 1)
        nll = -logp.gather(1, target.unsqueeze(1)).view(n, b)
        smooth = -logp.mean(1).view(n, b)
        if self._eps is None:
            # float32 even under bf16 autocast: the smoothing the member was given, unrounded
            self._eps = torch.tensor(eps, device=logits.device).view(n, 1)
        return ((1 - self._eps) * nll + self._eps * smooth).mean(1)

    def on_validation_epoch_start(self) -> None:
        self._sums = torch.zeros(2, len(self.net), 3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self.net.forward_shared(x)  # [N, B, classes]
        n, b = logits.shape[:2]
        loss = F.cross_entropy(logits.reshape(n * b, -1), y.repeat(n),
                               reduction="none").view(n, b).sum(1)
        correct = (logits.argmax(2) == y).sum(1)
        count = torch.full_like(loss, len(y), dtype=torch.float64)
        self._sums[dataloader_idx] += torch.stack([loss.double(), correct.double(), count], 1)

    def on_validation_epoch_end(self) -> None:
        sums = self._sums.tolist()  # one device->host sync per epoch
        for row, member in enumerate(self.active):
            (vl, vc, vn), (tl, tc, tn) = sums[0][row], sums[1][row]
            m = {VAL_LOSS: vl / vn, VAL_ACC: vc / vn}
            if tn > 0:
                m |= {TRAIN_LOSS: tl / tn, TRAIN_ACC: tc / tn}
                m[GAP] = m[TRAIN_ACC] - m[VAL_ACC]
            self.history[member].append(m)

    def stop(self, members: set[int]) -> list[int]:
        """Stop training the given (original) members; the rest go on, faster. Returns the
        rows kept (for the loader's per-member generators)."""
        rows = [r for r, m in enumerate(self.active) if m not in members]
        self.active = [self.active[r] for r in rows]
        if rows:
            self.net.keep(rows)
            self.label_smoothings = [self.label_smoothings[r] for r in rows]
            if self.augments is not None:
                self.augments = [self.augments[r] for r in rows]
            self._strength = self._eps = None
            if self.opt is not None:
                self.opt.keep(rows)
        return rows
