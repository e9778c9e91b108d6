"""Speed-ups applied from outside the model: a reader of ``models/`` can ignore this package.

Everything here computes what the reference modules in ``models/`` compute, up to float
rounding, and is proven equal to them by tests.
"""
