"""edged's benchmarks (issue 8): the daemon measured against the bare model, on this machine.

Each module measures one thing and returns `Figure`s; `run.py` runs them all and prints one
table. Figures are ratios, percentiles and shares taken within one run, because the machines
these run on are shared and noisy; nothing here asserts an absolute time.
"""
