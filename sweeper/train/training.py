"""One trial's training: resolve its config, build the model, fit it with Lightning.

Knows nothing of Optuna or MLflow: the study passes `on_epoch(epoch, metrics) -> stop?`,
called after each epoch's evaluation, and does reporting/pruning/logging there.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_modules.augment import BatchAugment
from lightning_modules.classifier import Classifier
from lightning_modules.models import Architecture, build_model, count_params
from sweeper.settings import search_space
from sweeper.settings.config import AugmentConfig, Config
from sweeper.settings.errors import UserError
from sweeper.train.batches import IndexBatches, ShuffledGroups
from sweeper.train.data import Splits

EpochHook = Callable[[int, dict[str, float]], bool]

# Lightning sets this on import so that CUDA checks do not poison forked DataLoader workers; we
# fork none, and with it set every optimizer step re-probes NVML (~30 us a step on CPU).
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
# Our loaders are index slices of tensors already on the device; Lightning's advice about
# DataLoader workers and small-batch logging intervals does not apply.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
# PopulationClassifier steps its own StackedOptimizer (per-member learning rates).
warnings.filterwarnings("ignore", message=".*configure_optimizers. returned .None.*")


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs: config defaults overridden by the sampled parameters."""

    arch: Architecture
    optimizer: str
    lr_schedule: str
    lr: float
    weight_decay: float
    batch_size: int
    eval_batch_size: int
    steps_per_execution: int
    max_epochs: int
    seed: int
    label_smoothing: float = 0.0
    augment: AugmentConfig | None = None  # with augment_strength applied
    augment_strength: float = 1.0
    precision: str = "32"  # 32 | tf32 | bf16 (trainer.precision)

    def mlflow_params(self) -> dict[str, Any]:
        a = self.arch
        channels = "-".join(map(str, a.hidden))
        if a.family == "mlp":
            width: Any = a.hidden[0] if len(set(a.hidden)) == 1 else channels
            shape: dict[str, Any] = {"depth": len(a.hidden), "width": width}
        elif a.family == "cnn":
            shape = {"depth": len(a.hidden), "width": a.hidden[0], "channels": channels,
                     "kernel": a.kernel, "batch_norm": a.batch_norm}
        else:
            shape = {"depth": a.blocks, "width": a.hidden[0], "channels": channels}
        aug = self.augment
        return {"family": a.family, **shape, "dropout": a.dropout, "lr": self.lr,
                "batch_size": self.batch_size, "max_epochs": self.max_epochs,
                "optimizer": self.optimizer, "lr_schedule": self.lr_schedule,
                "weight_decay": self.weight_decay, "label_smoothing": self.label_smoothing,
                "augment": aug.name if aug else "none",
                **({"augment_strength": self.augment_strength} if aug else {}),
                "precision": self.precision, "seed": self.seed}


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed derives from (study seed, trial number): one trial can be re-run alone."""
    return (study_seed * 1_000_003 + number) % 2**31


def resolve(cfg: Config, params: dict[str, Any], number: int) -> TrialSpec:
    m = cfg.model
    family = str(params.get("family", m.family))
    depth = int(params.get("depth", m.depth_by_family.get(family, m.depth)))
    kernel = int(params.get("kernel", m.kernel))
    batch_norm = bool(params.get("batch_norm", m.batch_norm))
    mult = float(params.get("channel_mult", m.channel_mult))
    dropout = float(params.get("dropout", m.dropout))

    def arch(width: int) -> Architecture:
        blocks = 1
        if family == "cnn":  # channels grow by channel_mult every second block
            hidden = tuple(max(1, round(width * mult ** (i // 2))) for i in range(depth))
        elif family == "resnet":  # three stages (28, 14, 7 pixels), width doubling
            hidden, blocks = (width, 2 * width, 4 * width), depth
        elif "width_0" in params:
            hidden = tuple(int(params[f"width_{i}"]) for i in range(depth))
        else:
            hidden = (width,) * depth
        return Architecture(family, hidden, dropout, kernel=kernel, batch_norm=batch_norm,
                            blocks=blocks)

    if "size" in params:  # matched sizes across families: the width closest to the target
        chosen = width_for_size(arch, int(params["size"]))
    else:
        chosen = arch(int(params.get("width", m.width)))
    t = cfg.trainer
    strength = float(params.get("augment_strength", 1.0))
    a = cfg.augment
    augment = None if a.name == "none" else dataclasses.replace(
        a, rotate=a.rotate * strength, translate=a.translate * strength,
        scale=a.scale * strength, elastic_alpha=a.elastic_alpha * strength)
    return TrialSpec(
        arch=chosen,
        label_smoothing=float(params.get("label_smoothing", t.label_smoothing)),
        augment=augment, augment_strength=strength,
        optimizer=t.optimizer, lr_schedule=t.lr_schedule, lr=float(params.get("lr", t.lr)),
        weight_decay=float(params.get("weight_decay", t.weight_decay)),
        batch_size=int(params.get("batch_size", t.batch_size)),
        eval_batch_size=t.eval_batch_size, steps_per_execution=t.steps_per_execution,
        max_epochs=t.max_epochs, precision=t.precision,
        seed=trial_seed(cfg.seed, number))


def width_for_size(arch: Callable[[int], Architecture], target: int) -> Architecture:
    """The architecture whose parameter count is closest to `target` (28x28 grey images, 10
    classes: every source here). Counted on the meta device: no memory, microseconds."""
    def size(width: int) -> int:
        with torch.device("meta"):
            return count_params(build_model(arch(width), (1, 28, 28), 10))

    lo, hi = 1, 1
    while size(hi) < target and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # size(lo) < target <= size(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda w: abs(size(w) - target))
    return arch(best)


def accelerator(name: str) -> torch.device:
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={name} but no CUDA GPU is visible; use auto or cpu")
    use_cuda = name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _mkldnn_bf16() -> bool:
    # oneDNN runs torch's CPU bf16 matmuls; it may be capped below the CPU (ONEDNN_MAX_CPU_ISA).
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_note(precision: str, device: torch.device) -> str | None:
    """Where trainer.precision=bf16 has no bfloat16 arithmetic to run on, it is emulated.
    mlp_best on a 2-core CPU with AVX512-BF16: an epoch 5.7 s in bf16, 10.2 s in float32; with
    oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) 279 s in bf16, 8.9 s in float32 (and a
    2 x 1024 matmul benchmark, capped at AVX512_CORE: bf16 2x slower than float32; that cap, an
    environment setting between AVX-512 and its BF16 level, goes unnoticed here)."""
    if precision != "bf16":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return "note: trainer.precision=bf16 on this GPU is emulated, slower than float32"
    # x86: avx512_bf16, amx_bf16 (avx_ne_convert: bf16 conversions oneDNN uses; not measured
    # here); Arm: bf16, sve_bf16
    caps = torch.cpu.get_capabilities()
    if any(v is True and ("bf16" in k or k == "avx_ne_convert") for k, v in caps.items()) \
            and _mkldnn_bf16():
        return None
    return ("note: trainer.precision=bf16 on this CPU (no bfloat16 instructions in use) is "
            "emulated, slower than float32 (mlp_best: 31x where only AVX2 was in use)")


class _EpochEnd(pl.Callback):
    def __init__(self, hook: EpochHook):
        self.hook = hook

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, Classifier)
        if self.hook(len(pl_module.history), pl_module.history[-1]):
            trainer.should_stop = True


def make_augment(a: AugmentConfig | None, seed: int) -> BatchAugment | None:
    if a is None or a.name == "none":
        return None
    return BatchAugment(a.rotate, a.translate, a.scale,
                        a.elastic_alpha if a.name == "elastic" else 0.0, a.elastic_sigma, seed)


CHANNELS_LAST_MIN = 16  # narrowest conv layer for NHWC (scripts/bench_channels_last.py)


def train_bytes(spec: TrialSpec, in_shape: tuple[int, ...], n_classes: int = 10
                ) -> tuple[int, int]:
    """(parameters, bytes one trial needs to train), counted before anything is allocated:
    weights, gradients and optimizer state, plus the activations autograd keeps for one
    training batch (x2: the gradients flowing back) or evaluation's largest layer at its batch
    size, whichever is more; 25% margin. MLPs by formula; conv nets by a forward pass on the
    meta device (shapes only). 1-2.5x the measured peak (tests/test_memory.py)."""
    a = spec.arch
    try:
        with torch.device("meta"):
            net = build_model(spec.arch, in_shape, n_classes).train()
        params = count_params(net)
    except RuntimeError as e:  # a layer too large for torch's size arithmetic (int64 bytes)
        if "overflow" not in str(e):
            raise
        if a.family != "mlp":
            raise UserError(f"a network of this search space is too large to build ({e}); "
                            "lower the largest size setting") from None
        sizes = [math.prod(in_shape), *a.hidden, n_classes]  # weights and biases
        params = sum((i + 1) * o for i, o in itertools.pairwise(sizes))
        net = None
    if a.family == "mlp":  # per image: flatten, then linear, ReLU (and dropout) per layer
        outs = [math.prod(in_shape), *(h for h in a.hidden for _ in range(2 + (a.dropout > 0))),
                n_classes]
    else:
        assert net is not None  # built: only an MLP is counted without building
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o[0].numel()))
                 for m in net.modules() if not list(m.children())]
        with torch.device("meta"):
            net(torch.empty((1, *in_shape)))
        for h in hooks:
            h.remove()
    # weights, gradients, 1-2 optimizer states and the optimizer's temporaries (measured:
    # SGD with 3 copies came to 0.99x of its peak under VmHWM)
    copies = 4 if spec.optimizer == "sgd" else 6
    acts = max(2 * sum(outs) * spec.batch_size, 2 * max(outs) * spec.eval_batch_size)
    return params, int(1.25 * 4 * (copies * params + acts))


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":  # free on the device + what PyTorch holds cached but unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:  # Linux: what the kernel says it can give without swapping
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_fits(spec: TrialSpec, splits: Splits) -> None:
    """A network that cannot fit in memory is refused before it is built (on a CPU nothing
    would raise: the kernel's out-of-memory killer ends the process)."""
    params, need = train_bytes(spec, splits.in_shape, splits.n_classes)
    free = free_bytes(splits.x_train.device)
    if need > free:
        raise UserError(f"{spec.arch.family} {'-'.join(map(str, spec.arch.hidden))} "
                        f"({params:,} parameters) needs about {gigabytes(need)} to train, more "
                        f"than the {gigabytes(free)} free here: not built")


def check_space_fits(cfg: Config, splits: Splits) -> None:
    """At start: the space's largest network must fit in memory, or the study is refused with
    the setting to lower (before: a width of tens of thousands took the machine down)."""
    space = cfg.search.space
    free = free_bytes(splits.x_train.device)
    smallest = search_space.extreme_points(space, cfg.model.depth, largest=False)[0]
    for point in search_space.extreme_points(space, cfg.model.depth):
        spec = resolve(cfg, point, 0)
        params, need = train_bytes(spec, splits.in_shape, splits.n_classes)
        if need <= free:
            continue
        growing = [n for n in search_space.GROWS if n in space and n in smallest]
        if "width" in space and space["width"].per_layer:
            growing.append("width")

        def lowered(name: str, point: dict[str, Any] = point) -> int:
            at_low = point | {k: v for k, v in smallest.items()
                              if k == name or k.startswith(f"{name}_")}
            return train_bytes(resolve(cfg, at_low, 0), splits.in_shape, splits.n_classes)[1]

        blame = min(growing, key=lowered) if growing else None
        shown = ", ".join(f"{k}={v}" for k, v in point.items()
                          if k.split("_")[0] in search_space.GROWS or k == "family")
        raise UserError(
            f"search.space: its largest network ({shown}: {params:,} parameters) needs about "
            f"{gigabytes(need)} to train, more than the {gigabytes(free)} free here; "
            + (f"lower search.space.{blame}.high" if blame else "use a smaller network"))


def build(spec: TrialSpec, splits: Splits) -> Classifier:
    check_fits(spec, splits)
    pl.seed_everything(spec.seed, verbose=False)
    net = build_model(spec.arch, splits.in_shape, splits.n_classes)
    if spec.arch.family != "mlp" and min(spec.arch.hidden) >= CHANNELS_LAST_MIN:
        # NHWC weights make convolutions run channels-last: 1.35x faster per CPU step here
        # (147 vs 198 ms for the cnn_best network, batch 128, one thread). Not for very narrow
        # nets: oneDNN's channels-last 1x1 convolution backward takes >7 s a step with 4 or 5
        # channels (0.05 s in NCHW), and below 16 channels NHWC gains nothing.
        net = net.to(memory_format=torch.channels_last)
    total_steps = spec.max_epochs * -(-len(splits.y_train) // spec.batch_size)
    return Classifier(net, spec.optimizer, spec.lr, spec.weight_decay, spec.lr_schedule,
                      total_steps, spec.label_smoothing, make_augment(spec.augment, spec.seed))


@torch.inference_mode()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net = net.to(x.device).eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    return correct / len(y)


def n_params(module: Classifier) -> int:
    return count_params(module.net)


def make_trainer(device: torch.device, max_epochs: int, callback: pl.Callback,
                 precision: str = "32") -> pl.Trainer:
    # Set both ways every time: torch's defaults differ (cuDNN convolutions are TF32 unless
    # told otherwise, matmuls are not), and one process may run studies of both precisions.
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback])


def evals(splits: Splits, batch_size: int) -> list[IndexBatches]:
    return [IndexBatches(splits.x_val, splits.y_val, batch_size),
            IndexBatches(splits.x_train_eval, splits.y_train_eval, batch_size)]


def fit(module: Classifier, spec: TrialSpec, splits: Splits, on_epoch: EpochHook) -> None:
    train = ShuffledGroups(splits.x_train, splits.y_train, spec.batch_size,
                           spec.steps_per_execution, seed=spec.seed)
    trainer = make_trainer(splits.x_train.device, spec.max_epochs, _EpochEnd(on_epoch),
                           spec.precision)
    run_fit(trainer, module, train, evals(splits, spec.eval_batch_size))


def run_fit(trainer: pl.Trainer, module: pl.LightningModule, train: Any, val: Any) -> None:
    """trainer.fit, where Ctrl-C (and SIGTERM, which the study turns into one) stays a
    KeyboardInterrupt: Lightning catches it, calls sys.exit(1) and leaves SIGINT ignored."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # raised inside Lightning's except
            raise e.__context__ from None
        raise
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)
