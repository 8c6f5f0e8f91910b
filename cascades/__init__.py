"""IDK cascades (Wang, Crankshaw et al., UAI'18): cheap classifiers answer or say "I don't know" and
defer to costlier ones; thresholds learned for least expected cost under an accuracy constraint.

The Lightning system that learns IDK heads with the cost-aware objective is
:class:`experiments.systems.IDKCascadeModule`.
"""

from cascades.adapters import CascadeAdapter
from cascades.model import CascadeOutput, Ensemble, IDKCascade, StageOutputs, build_cascade, load_cascade_state

__all__ = ["CascadeAdapter", "CascadeOutput", "Ensemble", "IDKCascade", "StageOutputs", "build_cascade",
           "load_cascade_state"]
