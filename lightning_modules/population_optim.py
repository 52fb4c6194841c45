"""The population's optimizer: Adam / AdamW / SGD (momentum 0.9, Nesterov) over stacked
parameters (member i is row i of every tensor) with one learning rate and weight decay per member.

One arithmetic in two forms. Unfused: torch.optim's single-tensor code op for op, the per-member
scalars broadcast along dim 0; each op reads and writes whole stacked tensors (and allocates a
temporary): ~25 passes over the parameters' size per Adam step. Fused: the same formula as one
function per parameter tensor, compiled by torch.compile into one kernel that reads parameter,
gradient and moments once and writes parameter and moments once (7 passes; SGD 5). Compiling
costs seconds once per process (one graph per optimizer; shapes dynamic, every tensor flattened
to [members, -1]), so small populations, where a step is cheap anyway, stay unfused.
(`torch._foreach_*` with [M, 1] per-member tensors would not help: foreach's one-kernel path
needs equal shapes and falls back to one op per tensor, the unfused passes.)
"""

from collections.abc import Callable, Sequence

import torch

# Fused from this many stacked parameters (members x parameters each). Below it an unfused Adam
# step costs under ~35 ms on a busy 2-core CPU, so a compile (~4 s from Inductor's disk cache,
# ~25 s cold) would take hundreds of steps to pay off (docs/scale-out.md).
FUSED_MIN_NUMEL = 1_000_000


def _adam(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
          decay: torch.Tensor, l2: torch.Tensor, step_size: torch.Tensor,
          bc2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """Adam (decay = 1) or AdamW (l2 = 0) on [M, K] views, in place; decay, l2, step_size:
    [M, 1]. Multiplying by 1 and adding 0 * p are exact, so both are torch's formula."""
    p.mul_(decay)
    g = g + l2 * p
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))


def _sgd(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor,
         wd: torch.Tensor, momentum: float) -> None:
    """SGD with Nesterov momentum on [M, K] views, in place. buf starts at zero: the first
    step's 0 * momentum + g is torch's clone of g."""
    g = g + wd * p
    buf.mul_(momentum).add_(g)
    p.sub_(lr * (g + momentum * buf))


Update = Callable[..., None]
_COMPILED: dict[tuple[str, str], Update | None] = {}


def compiled(kind: str, device: torch.device) -> Update | None:
    """The compiled update ("adam" or "sgd") for this device type, built and tried once per
    process on small tensors; None, said once, where torch.compile cannot build it (no C++
    compiler, no Triton)."""
    key = (kind, device.type)
    if key not in _COMPILED:
        fn = torch.compile(_adam if kind == "adam" else _sgd, dynamic=True)
        # [2, 3], not 1s: dynamic shapes specialise sizes 0 and 1, the probe's graph is reused.
        t = [torch.rand(2, 3, device=device) for _ in range(4)]
        c = [torch.rand(2, 1, device=device) for _ in range(3)]  # distinct: no alias guards
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                if kind == "adam":
                    fn(*t, *c, torch.ones((), device=device), 0.9, 0.999, 1e-8)
                else:
                    fn(*t[:3], *c[:2], 0.9)
            _COMPILED[key] = fn
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"  note: the fused population update does not compile on {device.type} "
                  f"({type(e).__name__}: {reason[:200]}); using the unfused one", flush=True)
            _COMPILED[key] = None
    return _COMPILED[key]


class StackedOptimizer:
    """Adam / AdamW / SGD over stacked parameters with one learning rate and weight decay per
    member. fused: True, False, or None to decide at the first step (fused from
    FUSED_MIN_NUMEL stacked parameters, where it compiles)."""

    def __init__(self, name: str, lrs: Sequence[float], weight_decays: Sequence[float],
                 device: torch.device, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.9, fused: bool | None = None):
        if name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {name!r}")
        self.name, self.betas, self.eps, self.momentum = name, betas, eps, momentum
        # float64, as torch.optim computes lr * schedule / bias correction in Python floats.
        self.lr = torch.tensor(list(lrs), dtype=torch.float64, device=device)
        self.wd = torch.tensor(list(weight_decays), dtype=torch.float64, device=device)
        self.steps = 0
        self.state: list[list[torch.Tensor]] = []  # per parameter: [exp_avg, exp_avg_sq] | [buf]
        self.fused = fused
        self._update: Update | None = None

    def keep(self, idx: list[int]) -> None:
        sel = torch.tensor(idx, device=self.lr.device)
        self.lr, self.wd = self.lr[sel], self.wd[sel]
        self.state = [[s[sel] for s in st] for st in self.state]

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], factor: float = 1.0) -> None:
        """One step; `factor` scales every member's lr (the schedule)."""
        self.steps += 1
        lr = self.lr * factor
        if not self.state:
            if self.fused is None:
                self.fused = sum(p.numel() for p in params) >= FUSED_MIN_NUMEL
            if self.fused:
                self._update = compiled("sgd" if self.name == "sgd" else "adam", lr.device)
                self.fused = self._update is not None
            n = 1 if self.name == "sgd" else 2
            # Unfused SGD clones its first gradient into the buffer; fused starts from zero.
            self.state = [[torch.zeros_like(p) for _ in range(n)]
                          if self.fused or self.name != "sgd" else [] for p in params]
        if self.fused:
            self._fused_step(params, lr)
        else:
            self._unfused_step(params, lr)

    def _fused_step(self, params: Sequence[torch.Tensor], lr: torch.Tensor) -> None:
        assert self._update is not None
        dtype = params[0].dtype

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.to(dtype).view(-1, 1)

        if self.name == "sgd":
            scalars: tuple = (col(lr), col(self.wd), self.momentum)
        else:
            b1, b2 = self.betas
            bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
            if self.name == "adamw":
                decay, l2 = 1 - lr * self.wd, torch.zeros_like(lr)
            else:
                decay, l2 = torch.ones_like(lr), self.wd
            # A device tensor, not a float: the compiled graph takes it as an input.
            bc2_sqrt = torch.full((), bc2 ** 0.5, dtype=dtype, device=lr.device)
            scalars = (col(decay), col(l2), col(lr / bc1), bc2_sqrt, b1, b2, self.eps)
        # The optimizer runs in float32 also under bf16 autocast (one compiled graph).
        with torch.autocast(lr.device.type, enabled=False):
            for p, st in zip(params, self.state, strict=True):
                assert p.grad is not None
                g, p.grad = p.grad, None
                n = p.shape[0]
                # Views: the update writes parameter and state in place.
                self._update(p.detach().view(n, -1), g.reshape(n, -1), *(s.view(n, -1) for s in st),
                             *scalars)

    @staticmethod
    def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _unfused_step(self, params: Sequence[torch.Tensor], lr: torch.Tensor) -> None:
        """torch.optim's single-tensor arithmetic, op for op."""
        b1, b2 = self.betas
        for p, st in zip(params, self.state, strict=True):
            assert p.grad is not None
            g, p.grad = p.grad, None
            if self.name == "sgd":
                g = g + self._col(self.wd, p) * p
                if not st:
                    st.append(g.clone())
                else:
                    st[0].mul_(self.momentum).add_(g)
                g = g + self.momentum * st[0]
                p.sub_(self._col(lr, p) * g)
                continue
            if self.name == "adamw":
                p.mul_(self._col(1 - lr * self.wd, p))
            else:
                g = g + self._col(self.wd, p) * p
            m, v = st
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
            denom = (v.sqrt() / bc2 ** 0.5).add_(self.eps)
            p.add_(self._col(-(lr / bc1), p) * m / denom)
