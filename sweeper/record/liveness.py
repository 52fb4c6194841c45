"""Who is this worker, and is a worker of this machine still alive?

Each trial records its worker (keys.WORKER), and the ledger (ledger.py) keeps a heartbeat for
every trial and seed repeat a worker holds. A later start recovers trials left RUNNING by a dead
process: at once when the owner was a process of this machine and pid namespace that no longer
exists (kill -9, power loss), after `search.heartbeat_grace_s` without a heartbeat otherwise.

A worker is `host:boot-id:pid-namespace:pid:start-time`. The host name alone is not enough:
containers may share one and still not see each other's processes (another pid namespace), and
a machine that rebooted (another boot id) reuses pids. Only a worker whose first four parts
equal ours can be judged by looking for its process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


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
