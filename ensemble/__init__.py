"""ensemble: hierarchical facial-emotion recognition (valence/arousal neighborhoods + experts).

    import ensemble
    model = ensemble.load()            # the bundled model (or ensemble.load("path/to/run"))
    model.predict("photo.jpg")         # one record per face

Nothing heavy is imported until it is used: ``ensemble --help`` needs neither torch nor pandas.
"""

from .classes import CLASSES  # the leaf module: nothing heavy

__version__ = "0.1.0"
__all__ = ["CLASSES", "FlatPredictor", "HierarchicalPredictor", "Model", "load"]


def __getattr__(name):  # torch, numpy and pandas load on first use
    if name in ("FlatPredictor", "HierarchicalPredictor"):
        from . import predictors

        return getattr(predictors, name)
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
