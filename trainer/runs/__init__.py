"""Run folders: their layout, allocating, finding and claiming runs, their lock, config and metadata, and
listing them. Knows nothing of training; hands the checkpoint engine a folder (``RunLayout.checkpoint_folder``).

layout.py    every path of a run (the only place that spells the run layout's names)
store.py     allocate a run (every process agrees through rank 0), resolve ``--resume``, create it, config.json
claim.py     rank 0's first step on the run a launch asks for: find it, lock it, clear a crash's leftovers
lock.py      ``run.lock``: the launch training the run
metadata.py  ``metadata.json`` and ``RunHandle``, the live run's record (rank 0 writes)
repair.py    a damaged ``metadata.json`` or ``config.json`` rebuilt from the checkpoints
listing.py   ``--list-runs``: summaries, sorting, filters, the table
report.py    ``scripts/runs.py show`` and ``diff``
plots.py     ``--list-runs --plot``
"""
