"""Evaluation: items from test files and TSVs (``items``), greedy answers and per-group accuracy (``scoring``)."""
