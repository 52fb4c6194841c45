"""CNN and ResNet families, batched augmentation, lr schedules."""

import math

import pytest
import torch

from lightning_modules.augment import BatchAugment
from lightning_modules.models import Architecture, build_model, count_params
from lightning_modules.schedules import lr_factor
from sweeper.settings.config import Config, DataConfig
from sweeper.train import data, training

IN = (1, 28, 28)


def cnn_params(channels: tuple[int, ...], k: int, bn: bool) -> int:
    total, c, side, pools = 0, 1, 28, 0
    for i, c_out in enumerate(channels):
        total += c * c_out * k * k + (2 * c_out if bn else c_out)
        c = c_out
        if (i % 2 == 1 or i == len(channels) - 1) and pools < 3:
            side, pools = side // 2, pools + 1
    return total + c * side * side * 10 + 10


def resnet_params(w: int, blocks: int) -> int:
    total, c = 9 * w + 2 * w, w  # stem
    for s, width in enumerate((w, 2 * w, 4 * w)):
        for b in range(blocks):
            total += 9 * c * width + 2 * width + 9 * width * width + 2 * width
            if s > 0 and b == 0:
                total += c * width + 2 * width  # 1x1 projection
            c = width
    return total + c * 10 + 10


@pytest.mark.parametrize("channels,k,bn", [((8,), 3, True), ((16, 16), 5, False),
                                           ((8, 8, 16, 16, 32), 3, True)])
def test_cnn_shape_and_parameter_count(channels, k, bn):
    net = build_model(Architecture("cnn", channels, 0.3, kernel=k, batch_norm=bn), IN, 10)
    assert net(torch.zeros(3, *IN)).shape == (3, 10)
    assert count_params(net) == cnn_params(channels, k, bn)


@pytest.mark.parametrize("w,blocks", [(4, 1), (8, 2), (16, 1)])
def test_resnet_shape_and_parameter_count(w, blocks):
    net = build_model(Architecture("resnet", (w, 2 * w, 4 * w), 0.1, blocks=blocks), IN, 10)
    assert net(torch.zeros(2, *IN)).shape == (2, 10)
    assert count_params(net) == resnet_params(w, blocks)


def test_resolve_builds_each_family_from_config():
    cfg = Config()
    cfg.model.family, cfg.model.depth, cfg.model.width = "cnn", 5, 8
    spec = training.resolve(cfg, {"channel_mult": 1.5, "kernel": 5}, 0)
    assert spec.arch.hidden == (8, 8, 12, 12, 18) and spec.arch.kernel == 5
    cfg.model.family = "resnet"
    spec = training.resolve(cfg, {"depth": 2, "width": 16}, 0)
    assert spec.arch.hidden == (16, 32, 64) and spec.arch.blocks == 2
    assert spec.mlflow_params()["depth"] == 2 and spec.mlflow_params()["channels"] == "16-32-64"


@pytest.mark.parametrize("family, width, nhwc", [("resnet", 4, False), ("cnn", 8, False),
                                                 ("resnet", 16, True), ("cnn", 32, True)])
def test_only_conv_nets_of_16_channels_or_more_run_channels_last(family, width, nhwc):
    # oneDNN's channels-last 1x1 convolution backward took >7 s a step for a 4-channel ResNet
    # (0.05 s in NCHW): the test suite's tiny ResNet study ran for over 10 minutes.
    cfg = Config()
    cfg.model.family, cfg.model.depth, cfg.model.width = family, 2, width
    splits = data.load_splits(DataConfig(name="mnist_sample", val_size=1000), 0,
                              torch.device("cpu"))
    module = training.build(training.resolve(cfg, {}, 0), splits)
    # (a weight with one input channel or a 1x1 kernel is contiguous both ways)
    convs = [m.weight for m in module.net.modules() if isinstance(m, torch.nn.Conv2d)
             and m.in_channels > 1 and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == nhwc
                         and w.is_contiguous() != nhwc for w in convs)


def test_augmentation_keeps_shape_dtype_and_order_and_is_seeded():
    x = torch.from_numpy(data.load(DataConfig(name="mnist_sample")).images[:16]).float()
    x = x.div(255).unsqueeze(1)
    identity = BatchAugment(rotate=0, translate=0, scale=0, seed=0)
    assert torch.allclose(identity(x), x, atol=1e-5)  # no hidden reshuffle of the batch
    aug = BatchAugment(rotate=10, translate=0.1, scale=0.1, elastic_alpha=34, seed=3)
    out = aug(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x, atol=1e-3)
    # Image i is still image i (labels stay aligned): a square of intensity i/16 per image
    # still covers the centre after rotation, shift, zoom and elastic distortion.
    squares = torch.zeros(16, 1, 28, 28)
    for i in range(16):
        squares[i, :, 6:22, 6:22] = (i + 1) / 16
    centre = aug(squares)[:, 0, 13:15, 13:15].mean((1, 2))
    assert torch.allclose(centre, torch.arange(1, 17) / 16, atol=1e-4)
    again = BatchAugment(rotate=10, translate=0.1, scale=0.1, elastic_alpha=34, seed=3)
    assert torch.equal(again(x), out)
    other = BatchAugment(rotate=10, translate=0.1, scale=0.1, elastic_alpha=34, seed=4)
    assert not torch.equal(other(x), out)


def test_elastic_field_is_a_gaussian_blur_of_uniform_noise():
    """The matrix form of the blur gives Simard et al.'s field: the same numbers as a separable
    convolution with the normalized Gaussian kernel (radius 2 sigma, zero padding)."""
    import torch.nn.functional as F

    from lightning_modules.augment import _blur

    sigma = 4.0
    d = torch.rand(5, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.arange(-8, 9, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    want = F.conv2d(d, k.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, 8), groups=2)
    want = F.conv2d(want, k.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(8, 0), groups=2)
    got = _blur(28, sigma, d) @ d @ _blur(28, sigma, d).T
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_augmentation_is_applied_to_training_batches_only():
    splits = data.make_splits(data.load(DataConfig(name="mnist_sample")), 1000, 0,
                              torch.device("cpu"))
    cfg = Config()
    cfg.model.family, cfg.model.depth, cfg.model.width = "cnn", 2, 4
    cfg.augment.name = "affine"
    cfg.trainer.max_epochs, cfg.trainer.batch_size = 1, 200
    spec = training.resolve(cfg, {}, 0)
    module = training.build(spec, splits)
    assert module.augment is not None
    seen: list[int] = []
    real = module.augment.__call__
    module.augment = lambda x: (seen.append(len(x)), real(x))[1]  # type: ignore[assignment]
    training.fit(module, spec, splits, lambda epoch, m: False)
    assert seen == [200] * 20  # 4,000 training images; no validation batch went through it


def test_schedules():
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0)
    assert lr_factor("onecycle", 0.0) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 0.3) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) == pytest.approx(1 / 25e4)
    xs = [lr_factor("onecycle", i / 100) for i in range(101)]
    assert xs.index(max(xs)) == 30 and all(math.isfinite(v) for v in xs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["cnn", "resnet"])
def test_family_study_end_to_end_then_export(tiny_cfg, tmp_path, family):
    import optuna

    from sweeper.best_model import export
    from sweeper.loop.study import run_study
    from sweeper.settings.config import ParamSpec
    from tests.test_export import standalone_errors

    tiny_cfg.model.family = family
    tiny_cfg.augment.name = "affine" if family == "cnn" else "elastic"
    tiny_cfg.trainer.max_epochs, tiny_cfg.trainer.lr_schedule = 1, "onecycle"
    tiny_cfg.trainer.label_smoothing = 0.1
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space = {"depth": ParamSpec("int", low=1, high=2),
                             "width": ParamSpec("int", low=4, high=8)}
    study = run_study(tiny_cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:
        spec = training.resolve(tiny_cfg, t.params, t.number)
        assert t.user_attrs["n_params"] == count_params(build_model(spec.arch, IN, 10))
    assert study.best_value > 0.2  # 1 epoch on 4,000 images: it learns something
    out = tmp_path / "out"
    assert export.main(["--study", "tiny", "--out", str(out), "--storage",
                        tiny_cfg.search.storage, "--tracking-uri", tiny_cfg.tracking.uri]) == 0
    script, onnx = standalone_errors(study, out, tmp_path, 8)
    assert script < 1e-4 and onnx < 1e-4


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("size", [10_000, 100_000, 1_000_000])
def test_size_picks_the_width_with_the_closest_parameter_count(family, size):
    cfg = Config()
    cfg.model.depth_by_family = {"mlp": 2, "cnn": 4, "resnet": 1}
    spec = training.resolve(cfg, {"family": family, "size": size}, 0)
    n = count_params(build_model(spec.arch, IN, 10))
    assert spec.arch.family == family
    assert abs(n - size) / size < (0.05 if size > 10_000 else 0.2), (n, spec.arch.hidden)
    for delta in (-1, 1):  # no neighbouring width comes closer
        other = dataclass_replace_width(spec.arch, delta)
        assert abs(count_params(build_model(other, IN, 10)) - size) >= abs(n - size)


def dataclass_replace_width(arch: Architecture, delta: int) -> Architecture:
    import dataclasses

    scale = (arch.hidden[0] + delta) / arch.hidden[0]
    return dataclasses.replace(arch, hidden=tuple(round(h * scale) for h in arch.hidden))


def test_report_compares_families_at_equal_size():
    from sweeper.analysis.report import Row, families

    def row(family: str, n: int, val: float, gap: float) -> Row:
        return Row(0, "COMPLETE", 2, 8, 0.2, 1e-3, n, 10, val + gap, val, gap, family=family)

    rows = [row("mlp", 10_000, 0.95, 0.02), row("cnn", 10_500, 0.98, 0.01),
            row("mlp", 100_000, 0.97, 0.02), row("cnn", 98_000, 0.99, 0.005),
            row("resnet", 3_000_000, 0.99, 0.0)]
    text = families(rows)
    assert "cnn vs mlp: higher validation accuracy at 2 of 2 matched sizes (mean +2.50 " in text
    assert "gap -1.25 points" in text
    assert "resnet vs" not in text  # no size in common with the others
    assert families([r for r in rows if r.family == "mlp"]) == ""


@pytest.mark.slow
def test_family_by_size_study_and_its_report(tiny_cfg, tmp_path):
    from sweeper.analysis import report
    from sweeper.loop.study import run_study
    from sweeper.settings.config import ParamSpec

    tiny_cfg.model.depth_by_family = {"mlp": 1, "cnn": 2}
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.search.sampler, tiny_cfg.search.pruner, tiny_cfg.search.n_trials = "grid", "none", 4
    tiny_cfg.search.space = {"family": ParamSpec("categorical", choices=["mlp", "cnn"]),
                             "size": ParamSpec("categorical", choices=[4000, 12000])}
    study = run_study(tiny_cfg)
    got = sorted((t.params["family"], t.params["size"]) for t in study.trials)
    assert got == [("cnn", 4000), ("cnn", 12000), ("mlp", 4000), ("mlp", 12000)]
    for t in study.trials:  # each family got the width closest to the asked size
        assert abs(t.user_attrs["n_params"] - t.params["size"]) / t.params["size"] < 0.25
    out = tmp_path / "report"
    assert report.main(["--study", "tiny", "--storage", tiny_cfg.search.storage,
                        "--tracking-uri", tiny_cfg.tracking.uri, "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "At equal size" in md and "matched sizes" in md
    assert "| family | trial |" in md
    assert "heatmap_val.png: skipped" in md
