"""The eight emotion classes, the names other data sets use for them, and their V/A prototypes.

The leaf of the package: it imports nothing of ours and nothing heavy (numpy only, when a table is built), so
the config, the router and the CLI can read the class list without loading pandas, PIL or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import numpy as np

#: The canonical class order (AffectNet's expression codes 0-7), used for every logit.
CLASSES: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
VOTE_COLUMNS = [f"vote_{c}" for c in CLASSES]

#: Names other data sets use for our classes.
CLASS_ALIASES = {
    "neutral": "neutral",
    "neutrality": "neutral",
    "calm": "neutral",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "disgust": "disgust",
    "disgusted": "disgust",
    "anger": "anger",
    "angry": "anger",
    "contempt": "contempt",
    "contemptuous": "contempt",
}

#: Prototype (valence, arousal) per class, used to derive V/A where a data set has none.
#: Positions approximated from Russell's circumplex of affect (J. A. Russell, "A circumplex
#: model of affect", J. Pers. Soc. Psychol. 39(6):1161-1178, 1980, Fig. 2), the reference
#: AffectNet's annotators were shown (Mollahosseini et al., IEEE T-AFFC 10(1), 2019, §3.2),
#: scaled to [-1, 1]. Override per class with ``data.prototypes``.
VA_PROTOTYPES: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "happy": (0.8, 0.35),
    "sad": (-0.7, -0.35),
    "surprise": (0.25, 0.8),
    "fear": (-0.55, 0.75),
    "disgust": (-0.7, 0.3),
    "anger": (-0.6, 0.65),
    "contempt": (-0.5, 0.2),
}


def canonical_class(name: str) -> str | None:
    """Our class name for ``name`` (any case, any alias in :data:`CLASS_ALIASES`), or None."""
    return CLASS_ALIASES.get(str(name).strip().lower())


def prototype_table(overrides: dict | None = None) -> np.ndarray:
    """(8, 2) prototype V/A per class in canonical order; ``overrides`` maps a class (or alias) to [v, a]."""
    import numpy as np

    table = dict(VA_PROTOTYPES)
    for name, va in (overrides or {}).items():
        c = canonical_class(name)
        if c is None:
            raise UserError(f"data.prototypes: unknown class {name!r}")
        if not (isinstance(va, (list, tuple)) and len(va) == 2):
            raise UserError(f"data.prototypes.{name}: expected [valence, arousal]")
        table[c] = (float(va[0]), float(va[1]))
    return np.array([table[c] for c in CLASSES], dtype=np.float64)
