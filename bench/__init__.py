"""Benchmarks for aioenvelope, each figure printed next to references from the same run.

Run ``python bench/run.py`` (``--quick`` for CI's smoke run). ``common`` holds the
timing and the table; ``oneshot`` contributes cases (streaming and KMS modules will add
theirs to ``run.COLLECTORS``); ``esdk`` and ``floor`` are references; ``hotloop`` runs one
of our operations alone for a profiler.
"""
