"""The ``rmt`` command line: argument parsing and printing only; the work is done in :mod:`rmt`."""
