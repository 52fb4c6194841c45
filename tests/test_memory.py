"""Memory: a network is sized before it is built. A space whose largest network cannot fit is
refused at start, a trial that cannot fit fails with the reason, and the estimate bounds what
training really takes."""

import dataclasses
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from lightning_modules.models import Architecture
from sweeper.loop.study import run_study
from sweeper.settings import keys
from sweeper.settings.errors import UserError
from sweeper.train import training
from tests.cli import refusal
from tests.test_study import REPO


def test_a_space_whose_largest_network_cannot_fit_is_refused_at_start(tmp_path):
    # Before: widths of tens of thousands built billions of parameters until the kernel's
    # out-of-memory killer ended the process (at 21 GB), the study already created.
    message = refusal(tmp_path, "+experiment=smoke", "search.space.width=range(1,100000)")
    assert message.startswith("search.space: its largest network (depth=2, width=100000: ")
    assert "lower search.space.width.high" in message
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


def test_a_range_of_billions_is_refused_without_listing_it(tmp_path):
    # Before: the check listed every step of the range (3.4 GB in 20 s, no refusal), and a
    # width of 1e300 or a grid of billions of points crashed or listed them too.
    import tracemalloc

    tracemalloc.start()
    message = refusal(tmp_path, "+experiment=smoke", "search.space.width=range(1,2000000000)")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "lower search.space.width.high" in message and peak < 1e9, peak  # a list: 16 GB+
    assert "out of range: must be below 2**31" in refusal(
        tmp_path, "+experiment=smoke", "search.space.width=interval(16,1e300)")
    grid = refusal(tmp_path, "+experiment=smoke", "search.sampler=grid",
                   "search.space.depth=range(1,2)", "search.space.lr=choice(0.001)",
                   "search.space.dropout=choice(0.1)",
                   "search.space.width=range(1,2000000000)")
    assert "the grid has 4,000,000,000 points, more than 1,000,000" in grid
    steps = refusal(tmp_path, "+experiment=smoke", "search.space.lr=range(0.0001,1e30,step=0.0001)")
    assert "more than 1e+15 steps of 0.0001" in steps  # before: Optuna's DivisionImpossible


@pytest.mark.slow
def test_the_setting_named_is_the_one_that_makes_the_network_too_big(tmp_path):
    message = refusal(tmp_path, "+experiment=smoke", "search.space.depth.high=5000",
                      "search.space.width.high=512")
    assert "lower search.space.depth.high" in message


def test_a_trial_that_cannot_fit_fails_with_the_reason(tiny_cfg, monkeypatch):
    monkeypatch.setattr(training, "check_space_fits", lambda cfg, splits: None)
    monkeypatch.setattr(training, "free_bytes", lambda device: 1_000_000)  # 1 MB "free"
    tiny_cfg.search.n_trials, tiny_cfg.search.max_consecutive_failures = 1, 1
    with pytest.raises(UserError, match="1 trials failed in a row"):
        run_study(tiny_cfg)
    trial = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage).trials[0]
    assert trial.state == TrialState.FAIL
    assert "needs about" in trial.user_attrs[keys.ERROR]
    assert "more than the 1 MB free here: not built" in trial.user_attrs[keys.ERROR]


# Peak memory of this process image: VmHWM starts afresh at exec, while ru_maxrss keeps the
# parent's peak across fork and exec (a child of a big pytest process would measure pytest).
MEASURE = """
import sys, torch
def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
torch.set_num_threads(1)
from sweeper.train import training
from lightning_modules.models import Architecture, build_model
arch = eval(sys.argv[1])
spec = training.TrialSpec(arch=arch, optimizer=sys.argv[2], lr_schedule="constant", lr=1e-3,
                          weight_decay=0.0, batch_size=256, eval_batch_size=1000,
                          steps_per_execution=1, max_epochs=1, seed=0)
x, y = torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))
base = peak_bytes()
net = build_model(arch, (1, 28, 28), 10)
opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if sys.argv[2] == "sgd"
       else torch.optim.Adam(net.parameters()))
for _ in range(3):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x[:256]), y[:256]).backward()
    opt.step()
with torch.inference_mode():
    net.eval()(x)
peak = peak_bytes()
print(training.train_bytes(spec, (1, 28, 28))[1] / (peak - base))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
@pytest.mark.parametrize("arch, optimizer", [
    ('Architecture("mlp", (4096, 4096), 0.2)', "adam"),
    ('Architecture("mlp", (4096, 4096), 0.0)', "sgd"),
    ('Architecture("cnn", (64, 64, 128, 128), 0.2)', "adam"),
    ('Architecture("resnet", (32, 64, 128), 0.1, blocks=1)', "adam"),
])
def test_the_estimate_bounds_what_training_takes(arch, optimizer):
    # A fresh process so that its peak memory is this network's alone; the caller's environment
    # is kept (CI's user may need its HOME and caches) and stderr shown if it fails.
    out = subprocess.run([sys.executable, "-c", "from lightning_modules.models import "
                          "Architecture\n" + MEASURE, arch, optimizer], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = float(out.stdout.strip())
    assert 1.0 <= ratio <= 2.5, ratio  # never under what it took, at most 2.5 times it


def test_estimates_grow_with_the_network():
    spec = training.TrialSpec(arch=Architecture("mlp", (64,), 0.0), optimizer="adam",
                              lr_schedule="constant", lr=1e-3, weight_decay=0.0, batch_size=128,
                              eval_batch_size=1000, steps_per_execution=1, max_epochs=1, seed=0)
    small = training.train_bytes(spec, (1, 28, 28))
    big = training.train_bytes(dataclasses.replace(spec, arch=Architecture("mlp", (64, 4096),
                                                                           0.0)), (1, 28, 28))
    assert small[0] == 784 * 64 + 64 + 64 * 10 + 10
    assert big[0] == 784 * 64 + 64 + 64 * 4096 + 4096 + 4096 * 10 + 10
    assert big[1] / small[1] > 0.5 * big[0] / small[0]
