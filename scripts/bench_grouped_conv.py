"""CNN populations: one training step of N cnn_best networks three ways, side by side.

  separate  N networks, one after another (what N trials one at a time compute)
  grouped   PopulationCNN: the N members' channels side by side, grouped convolutions
            (lightning_modules/population.py; what search.population uses)
  vmap      torch.func.vmap of functional_call over the N networks' stacked weights and
            batch-norm buffers

Each step: forward on its own batch per member, cross-entropy, backward (no optimizer).
Median of --rounds interleaved rounds (machines drift), ms per step and per member.

    python scripts/bench_grouped_conv.py --members 4 16 --batch 128
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from lightning_modules.cnn import CNN
from lightning_modules.population import PopulationCNN

CHANNELS = (32, 32, 64, 64)  # cnn_best


def timed(fn, steps: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, nargs="+", default=[4])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    print(f"{name}; cnn_best network {CHANNELS}, batch {args.batch}; forward + backward")
    for n in args.members:
        med = measure(n, args.batch, args.steps, args.rounds, device)
        print(f"N={n}: " + " | ".join(f"{k} {v:.1f} ms ({v / n:.2f} per member)"
                                      for k, v in med.items())
              + f" | grouped vs separate {med['separate'] / med['grouped']:.2f}x, "
              f"grouped vs vmap {med['vmap'] / med['grouped']:.2f}x", flush=True)


def measure(n: int, batch: int, steps: int, rounds: int, device: torch.device
            ) -> dict[str, float]:
    """Median ms per step of each way, over interleaved rounds."""
    cuda = device.type == "cuda"
    nets = [CNN((1, 28, 28), CHANNELS, 10, dropout=0.0).to(device) for _ in range(n)]
    x = torch.randn(n, batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (n, batch), device=device)
    # As training.build makes a solo trial's network: channels-last weights.
    separate_nets = [CNN((1, 28, 28), CHANNELS, 10, dropout=0.0).to(device).to(
        memory_format=torch.channels_last) for _ in range(n)]
    pop = PopulationCNN(nets, [0.0] * n).to(device)
    params, buffers = stack_module_state(nets)  # type: ignore[arg-type]
    base = CNN((1, 28, 28), CHANNELS, 10).to("meta")

    def separate():
        for i, net in enumerate(separate_nets):
            F.cross_entropy(net(x[i]), y[i]).backward()

    def grouped():
        F.cross_entropy(pop(x).reshape(-1, 10), y.reshape(-1)).backward()

    def one(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    def vmapped():
        out = vmap(one)(params, buffers, x)
        torch.autograd.grad(F.cross_entropy(out.reshape(-1, 10), y.reshape(-1)),
                            list(params.values()))

    runs: dict[str, list[float]] = {"separate": [], "grouped": [], "vmap": []}
    for _ in range(rounds):
        for label, fn in (("separate", separate), ("grouped", grouped), ("vmap", vmapped)):
            runs[label].append(timed(fn, steps, cuda))
    return {k: statistics.median(v) for k, v in runs.items()}

if __name__ == "__main__":
    main()
