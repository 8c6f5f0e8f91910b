"""IDK cascades (Wang, Crankshaw et al., UAI'18): cheap classifiers answer or say "I don't know" and
defer to costlier ones; thresholds learned for least expected cost under an accuracy constraint."""

from cascades.model import (CascadeOutput, Ensemble, IDKCascade, StageOutputs, build_cascade, load_cascade_state,
                            load_stage)

__all__ = ["CascadeOutput", "Ensemble", "IDKCascade", "StageOutputs", "build_cascade", "load_cascade_state",
           "load_stage"]

from cascades.module import IDKCascadeModule  # noqa: E402

__all__ += ["IDKCascadeModule"]
