import errno


class UserError(Exception):
    """A problem the user can fix (bad value, bad file, bad store). Printed as one line, no
    traceback; `debug=true` or HYDRA_FULL_ERROR=1 re-raises it with the traceback."""


class Refused(UserError):
    """A run refused on its inputs, before it wrote anything."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters (quoted data can be huge)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class DiskFull(UserError):
    """A write failed because its disk (or quota) is full."""


# How a full disk shows itself: OSError's ENOSPC/EDQUOT text, torch.save's stream writer, SQLite.
DISK_FULL = ("No space left on device", "Disk quota exceeded", "unexpected pos",
             "database or disk is full")


def disk_full(e: BaseException) -> bool:
    """The error, or one it was raised from, says that a disk is full."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFull) or (isinstance(cause, OSError) and cause.errno in (
                errno.ENOSPC, errno.EDQUOT)) or any(m in str(cause) for m in DISK_FULL):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
