"""The classifiers of the seed papers, built from torchvision code with weights from a named file (never downloaded).

resnet50 and vit_b_16: the lung-ultrasound study's baselines; efficientnet_v2_m: the skin study's
(ImageNet-pretrained there: name the file in grid.classifier.weights). resnet18 and `tiny` (a 4-block
CNN, ~60k parameters) are for tests and the demo. The head is sized for the run's classes after the
weights are loaded, so an ImageNet state dict (1000-class head) loads as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2id.errors import UserError

IMAGENET_CLASSES = 1000


def tiny_cnn(num_classes: int, width: int = 16) -> nn.Module:
    """Four stride-2 conv blocks, a 4 x 4 average pool, dropout and a linear head (~60k parameters).

    The 4 x 4 grid (not global pooling) keeps where a structure is: a scan plane is defined by which structures
    sit where, and a tiny receptive field alone sees mostly speckle."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width, 2 * width, 4 * width, 4 * width):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(channels * 16, num_classes))


def _architecture(name: str, imgsz: int) -> nn.Module:
    import torchvision.models as tv

    if name == "resnet18":
        return tv.resnet18(weights=None)
    if name == "resnet50":
        return tv.resnet50(weights=None)
    if name == "vit_b_16":
        return tv.vit_b_16(weights=None, image_size=imgsz)
    if name == "efficientnet_v2_m":
        return tv.efficientnet_v2_m(weights=None)
    raise UserError(f"grid.classifier.model {name!r}: use tiny, resnet18, resnet50, vit_b_16 or efficientnet_v2_m")


def _head(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding the final linear layer, that layer's attribute name)."""
    if name.startswith("resnet"):
        return model, "fc"
    if name == "vit_b_16":
        return model.heads, "head"
    return model.classifier, "1"  # efficientnet: Sequential(Dropout, Linear)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"grid.classifier.weights {path} does not exist: t2id never downloads weights; copy the file "
                        "there, or remove grid.classifier.weights to train from scratch")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"grid.classifier.weights {path}: expected a state dict (torch.save(model.state_dict()))")
    return state


def build_classifier(name: str, num_classes: int, imgsz: int, weights: Path | None = None) -> nn.Module:
    """The named classifier with a `num_classes` head; `weights` (a state dict file) loaded first, if given."""
    if name == "tiny":
        model = tiny_cnn(num_classes)
        if weights is not None:
            _load(model, load_state_dict(weights), weights, head_prefix=f"{len(model) - 1}.")
        return model
    model = _architecture(name, imgsz)
    parent, attr = _head(model, name)
    if weights is not None:
        head_prefix = {"resnet18": "fc.", "resnet50": "fc.", "vit_b_16": "heads.head."}.get(name, "classifier.1.")
        _load(model, load_state_dict(weights), weights, head_prefix)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: Path, head_prefix: str) -> None:
    """Load every backbone tensor; the head's may be absent or of another class count (it is replaced)."""
    own = model.state_dict()
    head = {k for k in own if k.startswith(head_prefix)}
    state = {k: v for k, v in state.items() if not (k in head and v.shape != own[k].shape)}
    missing = sorted(set(own) - set(state) - head)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys)
        raise UserError(f"grid.classifier.weights {path} does not fit grid.classifier.model ({detail}); name a state "
                        "dict of that architecture")
    model.load_state_dict(state, strict=False)
