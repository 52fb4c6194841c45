"""The parameters a search space may name, defined once: where each lands (the network, the
training recipe, augmentation), whether it takes integers, and whether the members of one
population share it (it shapes the weights or the batches). Imports nothing of sweeper's, so
config and sweep_grammar both read it."""

from __future__ import annotations

from typing import NamedTuple


class Param(NamedTuple):
    lands: str  # "model" | "trainer" | "augment"
    integer: bool = False
    shared: bool = False  # one value for a whole population (weight shapes, batch size)


PARAMS = {
    "family": Param("model"),
    "size": Param("model", integer=True, shared=True),
    "depth": Param("model", integer=True, shared=True),
    "width": Param("model", integer=True, shared=True),  # and width_0.. with per_layer
    "dropout": Param("model"),
    "kernel": Param("model", integer=True, shared=True),
    "channel_mult": Param("model", shared=True),
    "batch_norm": Param("model", shared=True),
    "lr": Param("trainer"),
    "batch_size": Param("trainer", integer=True, shared=True),
    "weight_decay": Param("trainer"),
    "label_smoothing": Param("trainer"),
    # Scales augment's rotate, translate, scale and elastic_alpha (1: as configured; 0: none).
    "augment_strength": Param("augment"),
}

MODEL_PARAMS = tuple(n for n, p in PARAMS.items() if p.lands == "model")
TRAINER_PARAMS = tuple(n for n, p in PARAMS.items() if p.lands == "trainer")
AUGMENT_PARAMS = tuple(n for n, p in PARAMS.items() if p.lands == "augment")
SEARCHABLE = tuple(PARAMS)
INTEGER_PARAMS = tuple(n for n, p in PARAMS.items() if p.integer)
SHARED = tuple(n for n, p in PARAMS.items() if p.shared)


def shared(params: dict[str, object]) -> dict[str, object]:
    """The values a population's members take from its first member."""
    return {k: v for k, v in params.items()
            if k.startswith("width_") or (k in PARAMS and PARAMS[k].shared)}
