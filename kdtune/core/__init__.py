"""The distillation core: one run in plain PyTorch (no Ray, Optuna or pydantic).

Importing the package registers the built-in losses, datasets and model families, so that
the registries (and the hyperparameter table in :mod:`kdtune.core.objectives`)
are complete whichever core module is imported first.
"""

from kdtune.core import arrays as _arrays  # noqa: F401  (registers the arrays dataset)
from kdtune.core import cifar_models as _cifar_models  # noqa: F401  (registers the CIFAR ResNets, WRNs, VGGs)
from kdtune.core import losses as _losses  # noqa: F401  (registers kl, kd, logit_mse, dkd, dist)
from kdtune.core import torchvision_models as _torchvision_models  # noqa: F401  (torchvision and timm families)
