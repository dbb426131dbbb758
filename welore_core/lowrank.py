"""The low-rank linear layer (W ≈ B·A) and the one place where modules are swapped.

A LowRankLinear holds A (k×in) and B (out×k): y = B·(A·x) (+ bias). It replaces an
nn.Linear of a decoder block when that matrix is a Low-Rank Component. Both are defined in
portable/modeling_welore.py, the modelling code every factorised checkpoint carries, so that
welore_core and plain transformers (trust_remote_code=True) build the very same modules.
"""

from .portable.modeling_welore import LowRankLinear, swap_module

__all__ = ["LowRankLinear", "swap_module"]
