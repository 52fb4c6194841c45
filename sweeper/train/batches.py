"""Batches as index slices of tensors already on the device: no Dataset, no DataLoader, no
per-sample Python. Lightning accepts any iterable with a length as a loader."""

import torch


class IndexBatches:
    """Evaluation loader: contiguous slices (views, no copy) of `batch_size` rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.y), self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]


class Group:
    """One Lightning step's mini-batches, gathered only as the step consumes them: a large
    group costs no memory, and Lightning passes it through untouched."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: list[torch.Tensor]):
        self.x, self.y, self.idx = x, y, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self):
        for j in self.idx:
            yield self.x[j], self.y[j]


class ShuffledGroups:
    """Training loader: a fresh permutation each epoch, cut into mini-batches of `batch_size`,
    handed out `group` mini-batches at a time (the LightningModule takes one optimizer step per
    mini-batch). Grouping is Keras' `steps_per_execution`: Lightning's fixed cost per step
    (~1 ms of loop and hooks here) is paid once per group; the optimization is unchanged."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, group: int, seed: int):
        self.x, self.y, self.batch_size, self.group = x, y, batch_size, group
        # Own generator: the batch order depends on the trial seed only, not on global RNG use.
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n_batches = -(-len(self.y) // self.batch_size)
        return -(-n_batches // self.group)

    def __iter__(self):
        n, bs = len(self.y), self.batch_size
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        starts = range(0, n, bs)
        for g in range(0, len(starts), self.group):
            yield Group(self.x, self.y, [order[i:i + bs] for i in starts[g:g + self.group]])


class PopulationGroups:
    """ShuffledGroups for a population: member i shuffles with its own seed (the same order its
    solo trial would see) and each mini-batch is [N, B, ...], one slice per member."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, group: int,
                 seeds: list[int]):
        self.x, self.y, self.batch_size, self.group = x, y, batch_size, group
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]

    def __len__(self) -> int:
        n_batches = -(-len(self.y) // self.batch_size)
        return -(-n_batches // self.group)

    def __iter__(self):
        n, bs = len(self.y), self.batch_size
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators])
        order = order.to(self.x.device)
        starts = range(0, n, bs)
        for g in range(0, len(starts), self.group):
            yield Group(self.x, self.y, [order[:, i:i + bs] for i in starts[g:g + self.group]])
