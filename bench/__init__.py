"""Benchmarks: the project's data and compute paths measured against naive pipelines and the hardware.

``python -m bench.run`` (``make bench``) runs the CPU suite and writes ``bench/results/latest.json``;
``python -m bench.gpu`` (``make gpu-bench``) is the one-command GPU benchmark. Each benchmark runs
our path and a naive reference in the same process, on the same data, and reports the median of
several repetitions after a warm-up, so a ratio never mixes machines or moments.
"""
