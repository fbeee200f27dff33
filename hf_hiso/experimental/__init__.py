"""Experimental zeroth-order estimators (opt-in, API may change): importing this package registers them by name.

* `"normalized"` ([`NormalizedEstimator`]): coefficients divided by the RMS of the averaged scalars (an EMA over
  steps), so that the learning rate is scale-free like Adam's.
* `"subset"` ([`SubsetEstimator`]): each direction perturbs a seeded subset of the trainable tensors (or parameter
  groups), rescaled so that the estimator keeps its mean.

Select one with `HiSoConfig(zo_estimator="normalized", zo_estimator_kwargs={"beta": 0.9})` or
`HiSoOptimizer(params, estimator=NormalizedEstimator(beta=0.9))`. Both send one scalar per direction, like HiSo.
"""

import warnings

from .normalized import NormalizedEstimator
from .subset import SubsetEstimator

warnings.warn(
    "hf_hiso.experimental: these estimators are experimental; their settings and results may change.",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["NormalizedEstimator", "SubsetEstimator"]
