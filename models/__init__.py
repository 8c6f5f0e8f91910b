"""Every model the framework builds, through one registry (timm's way): a name maps to a builder.

    from models import create_model, list_models
    net = create_model("resnet38_cifar", num_classes=10, in_chans=1)
    sk = create_model("skipnet38_cifar", num_classes=10, in_chans=1, gate="rnn")

Importing this package registers every family: CIFAR ResNets (6n+2), torchvision's ImageNet ResNets,
the cheap cascade stages (linear, MLP, tiny CNN), and SkipNet's gated ResNets; any timm model is
``timm/<name>``. Depends on :mod:`gating` (errors) and :mod:`skipnet` (the gated network class).
"""

from models import cifar_resnet, imagenet_resnet, skipnet, small  # noqa: E402,F401  (each registers its family)
from models.registry import create_model, is_model, list_models, register_model
from models.weights import load_pretrained, read_state_dict

__all__ = ["create_model", "is_model", "list_models", "load_pretrained", "read_state_dict", "register_model"]
