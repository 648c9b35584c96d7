"""Runs: the layout of a run folder, allocating and finding runs, their metadata, and listing them.

layout.py    every path of a run (the only place that spells the layout's names), tags
store.py     allocate a run (every process agrees through rank 0), resolve ``--resume``, create it
metadata.py  ``metadata.json`` and ``RunHandle``, the live run's record (rank 0 writes)
listing.py   ``--list-runs``: summaries, sorting, filters, the table
report.py    ``scripts/runs.py show`` and ``diff``
plots.py     ``--list-runs --plot``
"""
