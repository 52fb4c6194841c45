class UserError(Exception):
    """A problem the user can fix (bad value, bad file, bad store). Printed as one line, no
    traceback; `debug=true` or HYDRA_FULL_ERROR=1 re-raises it with the traceback."""
