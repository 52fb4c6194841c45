"""Who owns a RUNNING trial, and is it still alive?

Each trial records its worker (`host:pid:process-start-time`) and, while it trains, a heartbeat
in the Optuna storage (Optuna's own heartbeat mechanism, driven from a thread here because the
ask/tell loop does not start one). A later start recovers trials left RUNNING by a dead
process: at once when the owner was a process on this host that no longer exists (kill -9,
power loss), after `search.heartbeat_grace_s` without a heartbeat otherwise (another machine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import optuna

WORKER_ATTR = "sweeper.worker"


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


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def is_dead_here(worker: str) -> bool:
    """True only when `worker` ran on this host and that process is gone."""
    try:
        host, pid, started = worker.rsplit(":", 2)
        pid_int = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or pid_int == os.getpid():
        return False
    now = _start_time(pid_int)
    return now is None or (started != "" and now != "" and now != started)


def _enabled(study: optuna.Study) -> bool:
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def beat(study: optuna.Study, trial: optuna.Trial) -> None:
    # trial._trial_id: Optuna's heartbeat API is keyed by the storage id, not the number.
    if _enabled(study):
        study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]


class Heartbeat:
    """Records the heartbeat of the trial (or of each trial of a population) every `interval`
    seconds until stopped."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial | list[optuna.Trial],
                 interval: float):
        self.study, self.interval = study, interval
        self.trials = trial if isinstance(trial, list) else [trial]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for trial in self.trials:
                with contextlib.suppress(Exception):  # a missed beat is harmless
                    beat(self.study, trial)

    def __enter__(self) -> Heartbeat:
        if _enabled(self.study):
            for trial in self.trials:
                beat(self.study, trial)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
