"""The population optimizer's fused update (torch.compile) does what the unfused one and
torch.optim, one member at a time, do: every optimizer, every schedule, members dropped mid-way."""

import dataclasses

import pytest
import torch

from lightning_modules import population_optim
from lightning_modules.models import Architecture
from lightning_modules.population_optim import StackedOptimizer
from lightning_modules.schedules import lr_factor
from sweeper.loop import population
from sweeper.settings.config import LR_SCHEDULES, OPTIMIZERS, DataConfig
from sweeper.train import data, training

SHAPES = [(6, 5), (6,), (3, 2, 2, 2), (3,)]  # per member: linear, bias, conv kernel, bias
LRS = [1e-2, 2e-2, 5e-3, 3e-2]
WDS = [0.0, 1e-2, 0.1, 0.05]
STEPS = 9
KEEP = {2: [0, 2, 3], 5: [0, 2]}  # after these steps: the rows still training (stop())


def per_member(name: str, params: list[torch.Tensor], lr: float,
               wd: float) -> torch.optim.Optimizer:
    """torch.optim for one member, single-tensor arithmetic."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd,
                           foreach=False)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_update_is_the_per_member_arithmetic(name, schedule):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(len(LRS), *s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(len(LRS), *s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    stacked = {fused: [torch.nn.Parameter(p.clone()) for p in start] for fused in (True, False)}
    opts = {fused: StackedOptimizer(name, LRS, WDS, torch.device("cpu"), fused=fused)
            for fused in stacked}
    members = [[torch.nn.Parameter(p[i].clone()) for p in start] for i in range(len(LRS))]
    solo = [per_member(name, ps, lr, wd) for ps, lr, wd in zip(members, LRS, WDS, strict=True)]
    rows = list(range(len(LRS)))  # the member each row holds
    for step in range(STEPS):
        factor = lr_factor(schedule, step / STEPS)
        for fused, params in stacked.items():
            for p, g in zip(params, grads[step], strict=True):
                p.grad = g[rows].clone()
            opts[fused].step(params, factor)
        for i in rows:
            for p, g in zip(members[i], grads[step], strict=True):
                p.grad = g[i].clone()
            solo[i].param_groups[0]["lr"] = LRS[i] * factor
            solo[i].step()
        if step in KEEP:  # as PopulationClassifier.stop: rows kept, new stacked tensors
            keep = KEEP[step]
            rows = [rows[r] for r in keep]
            for fused in stacked:
                opts[fused].keep(keep)
                stacked[fused] = [torch.nn.Parameter(p.detach()[keep]) for p in stacked[fused]]
        for k in range(len(SHAPES)):
            fused, unfused = stacked[True][k].detach(), stacked[False][k].detach()
            alone = torch.stack([members[i][k].detach() for i in rows])
            torch.testing.assert_close(unfused, alone, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-7)
            for a, b in zip(opts[True].state[k], opts[False].state[k], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert opts[True].fused and not opts[False].fused  # compiled here, not fallen back
    assert len(rows) == 2 and not torch.equal(stacked[True][0][0], stacked[True][0][1])


def test_a_fused_population_trains_as_an_unfused_one(monkeypatch):
    """Through Lightning, with a member stopped after epoch 1: the same metrics and weights.
    The population's size picks the update (the threshold lowered here to fuse a small one)."""
    splits = data.make_splits(data.load(DataConfig(name="mnist_sample")), 500, 0,
                              torch.device("cpu"), train_size=768)
    base = training.TrialSpec(arch=Architecture("mlp", (32,), 0.1), optimizer="adamw",
                              lr_schedule="onecycle", lr=3e-3, weight_decay=1e-2,
                              batch_size=64, eval_batch_size=500, steps_per_execution=4,
                              max_epochs=2, seed=3)
    specs = [dataclasses.replace(base, seed=3 + i, lr=3e-3 * (i + 1),
                                 weight_decay=[1e-2, 0.0, 0.1][i]) for i in range(3)]

    def stop_after_1(epoch: int, metrics: dict) -> set[int]:
        return {1} if epoch == 1 else set()

    unfused = population.build_population(specs, splits)
    population.fit_population(unfused, specs, splits, stop_after_1)
    monkeypatch.setattr(population_optim, "FUSED_MIN_NUMEL", 0)
    fused = population.build_population(specs, splits)
    population.fit_population(fused, specs, splits, stop_after_1)
    assert unfused.opt is not None and fused.opt is not None
    assert not unfused.opt.fused and fused.opt.fused  # the default: small is unfused
    assert fused.active == [0, 2]
    for a, b in zip(fused.history, unfused.history, strict=True):
        assert len(a) == len(b)
        for ea, eb in zip(a, b, strict=True):
            assert ea == pytest.approx(eb, abs=1e-5)
    for row in range(2):
        for k, w in fused.net.member_state(row).items():
            torch.testing.assert_close(w, unfused.net.member_state(row)[k], rtol=1e-4,
                                       atol=1e-6)
