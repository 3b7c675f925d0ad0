"""Compute kernels shared by the methods and the trainer: dense matmuls on the fastest backend available
(matmul.py) and the cross-entropy of a language-model head computed in chunks (cross_entropy.py).

docs/performance.md gives the measurements behind each choice.
"""
