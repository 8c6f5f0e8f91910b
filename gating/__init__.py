"""The per-input decisions and what prices and executes them, shared by SkipNet and IDK cascades:

- gates (``gates``: FFGate-I/II, RNNGate) and IDK deciders (``idk``);
- decision modes (``policy``) and policy-gradient rewards (``reinforce``);
- threshold search (``thresholds``) and confidence calibration (``calibration``);
- the execution engine for skipped blocks and early exits (``execution``);
- the cost model: exact FLOPs, cost tables, latency (``cost``);
- the model-adapter interface evaluation and serving run models through (``adapters``).

Depends on nothing else of ours. Models live in :mod:`models`, training in :mod:`experiments`.
"""

from gating.errors import UserError

__all__ = ["UserError"]
