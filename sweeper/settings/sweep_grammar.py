"""Search-space entries in Hydra's sweep grammar, as Hydra's Optuna sweeper reads them:

    choice(1,2,3) or 1,2,3         -> categorical
    range(32,1024,step=32)         -> int (float if any bound is) with a step; stop included
    interval(0,0.5)                -> float; int for integer parameters (depth, width, ...)
    tag(log, interval(1e-4,3e-3))  -> log scale

Hydra's own override parser reads the expression; the result is the dict form of
`search.space.NAME` ({type, low, high, step, log, choices}), so both forms give one identity."""

from __future__ import annotations

import json
import re
from typing import Any

from sweeper.settings.errors import UserError
from sweeper.settings.params import INTEGER_PARAMS

FORMS = "choice(a,b,...), range(low,high,step=s), interval(low,high), tag(log, interval(low,high))"
SPACE_KEY = re.compile(r"^(\+{0,2})search\.space\.(\w+)=(.*)$", re.DOTALL)


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def spec_of(name: str, expression: str) -> dict[str, Any]:
    """`choice(1,2)` -> {'type': 'categorical', 'choices': [1, 2]}; a bad expression -> one line."""
    try:
        value = _parser().parse_override(f"{name}={expression}").value()
    except Exception as e:
        raise UserError(f"search.space.{name}={expression}: {_first_line(e)}; write one of "
                        f"{FORMS}") from None
    return spec_of_sweep(name, expression, value)


def spec_of_sweep(name: str, expression: str, value: Any) -> dict[str, Any]:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    where = f"search.space.{name}={expression}"
    tags = set(getattr(value, "tags", ()) or ())
    if tags - {"log"}:
        raise UserError(f"{where}: unknown tag {sorted(tags - {'log'})}; the only tag is log")
    if isinstance(value, ChoiceSweep):
        _no_log(where, tags, "choice")
        if value.shuffle:
            raise UserError(f"{where}: shuffle() means nothing to an Optuna search; drop it")
        return {"type": "categorical", "choices": list(value.list)}
    if isinstance(value, RangeSweep):
        _no_log(where, tags, "range (use tag(log, interval(...)))")
        if value.shuffle:
            raise UserError(f"{where}: shuffle() means nothing to an Optuna search; drop it")
        bounds = (value.start, value.stop, value.step)
        kind = "int" if all(isinstance(v, int) for v in bounds) else "float"
        return {"type": kind, "low": value.start, "high": value.stop, "step": value.step}
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        assert low is not None and high is not None  # the parser requires both
        # Hydra reads interval(1,4) as floats; a parameter that only takes integers means ints.
        if name in INTEGER_PARAMS and float(low).is_integer() and float(high).is_integer():
            low, high = int(low), int(high)
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return {"type": kind, "low": low, "high": high, "log": "log" in tags}
    raise UserError(f"{where}: not a search space entry; write one of {FORMS}. To fix the "
                    f"value instead, remove it from the space (search.space.{name}=null) and set "
                    f"model.{name} or trainer.{name}")


def _no_log(where: str, tags: set[str], what: str) -> None:
    if "log" in tags:
        raise UserError(f"{where}: tag(log, ...) applies to interval only, not {what}")


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip() and "hydra.cc/docs" not in ln]
    return " ".join(lines[:1])[:200] or type(e).__name__


def _value(v: Any) -> str:
    return json.dumps(v)  # quoted strings, true/false/null, numbers: all valid override values


def as_override(spec: dict[str, Any]) -> str:
    """The dict form in Hydra's override syntax (keys bare, values JSON)."""
    return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in spec.items()) + "}"


def rewrite(overrides: list[str]) -> list[str]:
    """`search.space.NAME=<sweep, or dict with a type>` replaces that entry whole, whatever its
    kind was (a dict without `type`, e.g. {high: 6}, changes the entry's fields as before).
    Hydra would merge a dict into the old entry ("Key 'choices' is not in struct") and refuses
    sweep expressions outside --multirun; `++...=null` then `++...={spec}` replaces it."""
    out: list[str] = []
    for arg in overrides:
        m = SPACE_KEY.match(arg)
        if not m or arg.startswith(("~", "-")):
            out.append(arg)
            continue
        _, name, expression = m.groups()
        try:
            value = _parser().parse_override(f"{name}={expression}").value()
        except Exception as e:
            raise UserError(f"search.space.{name}={expression}: {_first_line(e)}; write one of "
                            f"{FORMS}, or {{type: ..., low: ..., high: ...}}") from None
        if value is None:
            out.append(f"++search.space.{name}=null")
            continue
        if isinstance(value, dict) and "type" not in value:  # {high: 6}: Hydra merges it
            out.append(arg)
            continue
        spec = value if isinstance(value, dict) else spec_of_sweep(name, expression, value)
        out += [f"++search.space.{name}=null", f"++search.space.{name}={as_override(spec)}"]
    return out

