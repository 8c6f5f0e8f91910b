"""The shared layer of the framework: backbones registry, cost accounting, and (as they land) gates,
IDK deciders, policy-gradient training and threshold calibration. Depends on nothing else of ours."""

from gating.backbones import create_model, is_model, list_models, register_model
from gating.errors import UserError

__all__ = ["UserError", "create_model", "is_model", "list_models", "register_model"]
