"""ensemble: hierarchical facial-emotion recognition (valence/arousal neighborhoods + experts)."""

from .classes import CLASSES

__version__ = "0.1.0"
__all__ = ["CLASSES", "FlatPredictor", "HierarchicalPredictor"]


def __getattr__(name):  # the predictors import torch: load them on first use
    if name in ("FlatPredictor", "HierarchicalPredictor"):
        from . import predictors

        return getattr(predictors, name)
    raise AttributeError(name)
