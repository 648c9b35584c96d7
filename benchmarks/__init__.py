"""Benchmarks: the performance ratios of `make bench` (``python benchmarks/perf.py``) and the sample quality
of the demo model (``sample_quality.py``, `make bench-quality`).

perf.py          the entry point of `make bench`: which figures, the table, results.md
settings.py      sizes and repetitions (``Setup``: what the command line may change)
harness.py       ``Figure`` and its target, medians, the table and results.md, ``BenchError``
launching.py     starting the scripts (as tests/helpers.py does), stamping their stdout, ``time_sliced``
runs.py          what a finished trainer run tells: epoch stamps, saves (``logs/events.jsonl``), history
fake_data.py     the fake CIFAR folders the runs train on
hand_loop.py     the baseline: a minimal hand-written Accelerate loop, started as its own process
measurements.py  the launches the figures share (``Measurements``), each made once
figures/         one module per figure; ``figures/__init__.py`` registers them
flops.py         training FLOPs per image (``perf.py --flops``, ``scripts/gpu_check.py``: MFU on GPUs)
"""
