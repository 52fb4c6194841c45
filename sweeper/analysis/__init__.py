"""Analysis: the size effect, its statistics and calibration, the report, console lines."""
