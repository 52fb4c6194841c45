"""Named moments where the fault tests stop this process: SWEEPER_TEST_STOP_AT=NAME (SIGKILL)
or NAME:SIGINT / NAME:SIGTERM. They drive a sweep or an export to an exact point instead of
hoping a sleep lands there. Unset (always, outside tests), `reached` does nothing."""

import os
import signal

VARIABLE = "SWEEPER_TEST_STOP_AT"


def reached(name: str) -> None:
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    point, _, sig = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
