"""Evaluation harness: benchmark loaders, a seeded offline synthetic suite, metrics, runner, reports.

Layout
------
- ``metrics``: answer extraction (boxed, GSM8K, multiple choice) and scoring functions (exact
  match, RULER string match, LongBench token F1 / ROUGE-L / classification / retrieval, TSV row F1,
  MATH-style equivalence, relative accuracy).
- ``textpool``: the train / eval split of offline English text (Python's pydoc topics).
- ``tasks``: one module per benchmark family plus ``synthetic``; ``tasks.TASKS`` is the registry.
"""
