"""Layout of the cosine-statistics op shared by the op wrapper, the torch path and the kernel.

Each backend returns, per matrix of x [..., M, D], the triple ``(sum f64, max, max_abs)`` over
the off-diagonal cosines cos_ij = <x_i, x_j> / (|x_i| |x_j| + COSINE_EPS). Leaf module.
"""

COSINE_EPS = 1e-8  # the original code's denominator term: zero rows give cosine 0
