"""Evaluation of trained models: bits/dim, FID / Inception Score, and a small-data classifier FD.

- :mod:`diffjax.evaluation.bpd`: negative log-likelihood in bits/dim from the full variational
  bound over all T steps (Ho et al. 2020 eq. 5; the official ``calc_bpd_loop``).
- :mod:`diffjax.evaluation.inception`: the FID Inception-v3 network (2015-12-05 graph) in Flax,
  with its preprocessing and loading of locally converted weights.
- :mod:`diffjax.evaluation.fid`: Frechet distance, Inception Score, statistics files.
- :mod:`diffjax.evaluation.digits_classifier`: a small MLP for grey labelled datasets and the
  Frechet distance in its feature space (not comparable to FID).
- :mod:`diffjax.evaluation.run_metrics`: each metric of the command line over a restored run
  (a function per metric over a ``MetricContext``); imported on its own, not from here.

The command line is ``diffjax evaluate`` (or ``python -m diffjax.evaluate``).
"""

from diffjax.evaluation.bpd import accumulate_bpd, bpd_batch, evaluate_bpd, make_bpd_step
from diffjax.evaluation.fid import (
    FeatureStats,
    compute_statistics,
    frechet_distance,
    frechet_distance_stats,
    inception_score,
    load_statistics,
    save_statistics,
)
from diffjax.evaluation.inception import (
    InceptionV3,
    compute_inception_features,
    load_inception_variables,
    make_inception_fn,
    torch_state_dict_to_variables,
)

__all__ = [
    "FeatureStats",
    "InceptionV3",
    "accumulate_bpd",
    "bpd_batch",
    "compute_inception_features",
    "compute_statistics",
    "evaluate_bpd",
    "frechet_distance",
    "frechet_distance_stats",
    "inception_score",
    "load_inception_variables",
    "load_statistics",
    "make_bpd_step",
    "make_inception_fn",
    "save_statistics",
    "torch_state_dict_to_variables",
]
