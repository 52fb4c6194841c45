"""Configuration and search space: the typed config, the sweep grammar, keys, errors."""
