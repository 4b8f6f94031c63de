"""The reference backend (``backend="reference"``): the authors' dense method, plain autograd.

MedCare's published code computes every routed expert for every token, stacks an ``[E, T, d_out]``
tensor and gathers the top-k afterwards. This backend does exactly that, so it is the baseline in the
benchmarks and an oracle in the tests. ``auto`` never picks it. Each module exposes ``apply(...)``.
"""
