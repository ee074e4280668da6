"""kdtune: search knowledge-distillation hyperparameters with Ray Tune and Optuna.

One distillation run (:mod:`kdtune.distill`) is plain PyTorch; the search
(:mod:`kdtune.search`) wraps it in a Ray Tune trainable driven by an Optuna
sampler; :mod:`kdtune.analysis` turns a results folder into pandas tables.
"""

__version__ = "0.1.0"
