"""Channels-last (NHWC) vs NCHW per training step, for conv nets of each width, side by side.

    python scripts/bench_channels_last.py [--widths 4 5 8 16 32 64] [--timeout 30]

Each measurement runs in its own process (a pathological case cannot slow the next one) and
is cut off after --timeout seconds. sweeper/train/training.py uses NHWC from CHANNELS_LAST_MIN
channels up: below it, oneDNN's NHWC 1x1 convolution backward can be 100x slower.
"""

import argparse
import subprocess
import sys
import time

STEP = """
import sys, time, torch
torch.set_num_threads(2)
from lightning_modules.models import Architecture, build_model
fam, width, nhwc = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
hidden = (width, 2 * width, 4 * width) if fam == "resnet" else (width, width, 2 * width, 2 * width)
net = build_model(Architecture(fam, hidden, 0.2), (1, 28, 28), 10)
if nhwc:
    net = net.to(memory_format=torch.channels_last)
opt = torch.optim.Adam(net.parameters(), 1e-3)
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
for i in range(4):  # the first step warms up; the next three are timed
    if i == 1:
        t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print((time.perf_counter() - t0) / 3)
"""


def step_seconds(family: str, width: int, nhwc: bool, timeout: float) -> float | None:
    try:
        out = subprocess.run([sys.executable, "-c", STEP, family, str(width), str(int(nhwc))],
                             capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 5, 8, 16, 32, 64])
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    print("family  width   NCHW s/step   NHWC s/step   NHWC/NCHW")
    t0 = time.perf_counter()
    for family in ("cnn", "resnet"):
        for w in args.widths:
            a = step_seconds(family, w, False, args.timeout)
            b = step_seconds(family, w, True, args.timeout)

            def show(v: float | None) -> str:
                return f"{v:11.3f}" if v is not None else f" >{args.timeout / 4:8.1f}"

            ratio = f"{b / a:9.2f}" if a and b else "        -"
            print(f"{family:6s}  {w:5d}  {show(a)}   {show(b)}   {ratio}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s; batch 128, 2 threads, Adam; conv widths "
          "w,w,2w,2w (cnn) or stages w,2w,4w (resnet))")


if __name__ == "__main__":
    main()
