class UserError(Exception):
    """A problem the user can fix (bad value, bad file, bad store). Printed as one line, no
    traceback; `debug=true` or HYDRA_FULL_ERROR=1 re-raises it with the traceback."""


class Refused(UserError):
    """A run refused on its inputs, before it wrote anything."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters (quoted data can be huge)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
