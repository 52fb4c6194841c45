"""The study loop: asking trials, populations, seed repeats, how a trial ends."""
