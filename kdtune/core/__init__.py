"""The distillation core: one run in plain PyTorch (no Ray, Optuna or pydantic).

Importing the package registers the built-in losses, so that the hyperparameter
table (:mod:`kdtune.core.objectives`) is complete whichever core module is
imported first, and the ``arrays`` dataset beside the ones in :mod:`kdtune.core.data`.
"""

from kdtune.core import losses as _losses  # noqa: F401  (registers kl and logit_mse)
from kdtune.core import arrays as _arrays  # noqa: F401  (registers the arrays dataset)
