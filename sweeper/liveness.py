"""Who owns a RUNNING trial (or a seed repeat), and is it still alive?

Each trial records its worker (keys.WORKER) and, while it trains, a heartbeat in the Optuna
storage (Optuna's own heartbeat mechanism, driven from a thread here because the ask/tell loop
does not start one). A later start recovers trials left RUNNING by a dead process: at once when
the owner was a process of this machine and pid namespace that no longer exists (kill -9,
power loss), after `search.heartbeat_grace_s` without a heartbeat otherwise.

A worker is `host:boot-id:pid-namespace:pid:start-time`. The host name alone is not enough:
containers may share one and still not see each other's processes (another pid namespace), and
a machine that rebooted (another boot id) reuses pids. Only a worker whose first four parts
equal ours can be judged by looking for its process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from sweeper import keys, trial_writes


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:  # "pid:[4026531836]" -> "4026531836"
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None
    when there is no such process. Without /proc, "" for any live pid."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            # Field 22; split after the ')' that closes the command name, which may hold spaces.
            return stat.read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def this_machine() -> str:
    """host:boot-id:pid-namespace (empty parts where the system does not tell)."""
    return (f"{socket.gethostname()}:{_read('/proc/sys/kernel/random/boot_id')}:"
            f"{_pid_namespace()}")


def this_worker() -> str:
    return f"{this_machine()}:{os.getpid()}:{_start_time(os.getpid())}"


def is_dead_here(worker: str) -> bool:
    """True only when `worker` ran on this machine, in this pid namespace, and is gone."""
    try:
        machine, pid, started = worker.rsplit(":", 2)
        pid_int = int(pid)
    except ValueError:
        return False
    if machine != this_machine() or machine.count(":") != 2 or pid_int == os.getpid():
        return False
    now = _start_time(pid_int)
    return now is None or (started != "" and now != "" and now != started)


def claim_is_live(record: Any, grace_s: float) -> bool:
    """A seed repeat's claim (keys.CLAIMED_BY, keys.CLAIM_BEAT) whose worker is alive: not dead
    here, and renewed within the grace period."""
    if not isinstance(record, dict) or keys.CLAIMED_BY not in record:
        return False
    worker = record[keys.CLAIMED_BY]
    return not is_dead_here(worker) and (
        time.time() - float(record.get(keys.CLAIM_BEAT, 0)) <= grace_s)


class Every:
    """Calls `fn` every `interval` seconds from a daemon thread while inside the `with`."""

    def __init__(self, interval: float, fn: Callable[[], None]):
        self.interval, self.fn = interval, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is harmless
                self.fn()

    def __enter__(self) -> Every:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _enabled(study: optuna.Study) -> bool:
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def beat(study: optuna.Study, trials: list[optuna.Trial]) -> None:
    # trial._trial_id: Optuna's heartbeat API is keyed by the storage id, not the number.
    if _enabled(study) and trials:
        trial_writes.beat(study._storage, [t._trial_id for t in trials])


class Heartbeat(Every):
    """Records the heartbeat of the trial (or of each trial of a population) now and every
    `interval` seconds until stopped."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial | list[optuna.Trial],
                 interval: float):
        trials = trial if isinstance(trial, list) else [trial]

        super().__init__(interval, lambda: beat(study, trials))
        self.enabled = _enabled(study)

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self.fn()
            super().__enter__()
        return self
