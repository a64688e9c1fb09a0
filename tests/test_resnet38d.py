"""ResNet-38d backbone: the published weights' key layout loads exactly; shapes, stride, blocks, dropout;
and input normalisation taken from the backbone unless the config sets it."""

from __future__ import annotations

import pytest
import torch

from wsss.config import BackboneConfig, Config, DataConfig, load_config
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, backbone_normalisation
from wsss.io import DataError
from wsss.models import create_backbone

# The PyTorch conversion of `ilsvrc-cls_rna-a1_cls1000_ep-0001.params` (PSA / SEAM network/resnet38d.py:
# `convert_mxnet_to_torch` and `Net`): unit name, in, mid, out channels; kind "unit" = two 3x3 convs,
# "bot" = 1x1 (out/4) - 3x3 (out/2) - 1x1 (out). A 1x1 `conv_branch1` exists where the shape changes.
UNITS = [
    ("b2", 64, 128, 128, "unit"), ("b2_1", 128, 128, 128, "unit"), ("b2_2", 128, 128, 128, "unit"),
    ("b3", 128, 256, 256, "unit"), ("b3_1", 256, 256, 256, "unit"), ("b3_2", 256, 256, 256, "unit"),
    ("b4", 256, 512, 512, "unit"),
    *[(f"b4_{i}", 512, 512, 512, "unit") for i in range(1, 6)],
    ("b5", 512, 512, 1024, "unit"), ("b5_1", 1024, 512, 1024, "unit"), ("b5_2", 1024, 512, 1024, "unit"),
    ("b6", 1024, 512, 2048, "bot"), ("b7", 2048, 1024, 4096, "bot"),
]  # fmt: skip
BN = ("weight", "bias", "running_mean", "running_var")


def published_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"conv1a.weight": (64, 3, 3, 3)}
    for name, cin, mid, cout, kind in UNITS:
        shapes.update({f"{name}.bn_branch2a.{p}": (cin,) for p in BN})
        if kind == "unit":
            shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
            shapes.update({f"{name}.bn_branch2b1.{p}": (mid,) for p in BN})
            shapes[f"{name}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        else:
            q, h = cout // 4, cout // 2
            shapes[f"{name}.conv_branch2a.weight"] = (q, cin, 1, 1)
            shapes.update({f"{name}.bn_branch2b1.{p}": (q,) for p in BN})
            shapes[f"{name}.conv_branch2b1.weight"] = (h, q, 3, 3)
            shapes.update({f"{name}.bn_branch2b2.{p}": (h,) for p in BN})
            shapes[f"{name}.conv_branch2b2.weight"] = (cout, h, 1, 1)
        if cin != cout or kind == "bot" or name in ("b2", "b3", "b4"):
            shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    shapes.update({f"bn7.{p}": (4096,) for p in BN})
    return shapes


def fake_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    # One stored number per tensor, expanded to its shape: a tiny file with the published names and shapes.
    return {k: torch.full((1,), float(i + 1)).expand(s) for i, (k, s) in enumerate(shapes.items())}


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name="resnet38d", pretrained=False))


def test_state_dict_has_the_published_layout(backbone):
    sd = backbone.model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert got == published_shapes()
    assert (backbone.out_channels, backbone.stride, backbone.kind) == (4096, 8, "cnn")


def test_forward_shape_and_stride(backbone):
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 4096, 8, 8)
        assert backbone(torch.randn(1, 3, 60, 44)).shape == (1, 4096, 8, 6)  # ceil(H / 8)
    m = backbone.model
    assert m.b5.conv_branch2a.dilation == (1, 1) and m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b6.conv_branch2b1.dilation == (4, 4) and m.b7.conv_branch2b1.dilation == (4, 4)


def test_blocks_cover_every_parameter_in_order(backbone):
    blocks = backbone.blocks()
    assert blocks[0] is backbone.model.conv1a and blocks[1] is backbone.model.b2
    assert len(blocks) == 18  # conv1a, 16 units up to b6, b7 + bn7
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in backbone.model.parameters()) and len(set(ids)) == len(ids)
    # freezing conv1a and the b2 stage (SEAM) = training the last 14 blocks
    assert blocks[-14] is backbone.model.b3


def test_dropout_is_configurable():
    default = create_backbone(BackboneConfig(name="resnet38d", pretrained=False)).model
    assert (default.b6.dropout_2b1.p, default.b7.dropout_2b2.p) == (0.3, 0.5)
    off = create_backbone(BackboneConfig(name="resnet38d", pretrained=False, dropout=[0.0, 0.1])).model
    assert (off.b6.dropout_2b2.p, off.b7.dropout_2b1.p) == (0.0, 0.1)
    with pytest.raises(ValueError, match="two probabilities"):
        create_backbone(BackboneConfig(name="resnet38d", pretrained=False, dropout=[0.5]))


def test_published_weights_load_exactly(tmp_path):
    shapes = published_shapes()
    path = tmp_path / "res38d.pth"
    torch.save(fake_weights(shapes), path)
    bb = create_backbone(BackboneConfig(name="resnet38d", pretrained=False, weights=str(path)))
    sd = bb.model.state_dict()
    for i, k in enumerate(shapes):
        assert torch.all(sd[k] == float(i + 1)), k
    # a whole-model checkpoint (backbone.model.* keys) loads the same
    torch.save({"model": {f"backbone.model.{k}": v for k, v in fake_weights(shapes).items()}}, path)
    bb = create_backbone(BackboneConfig(name="resnet38d", pretrained=False, weights=str(path)))
    assert torch.all(bb.model.bn7.running_var == float(len(shapes)))


def test_bad_weights_name_the_keys(tmp_path):
    w = fake_weights(published_shapes())
    del w["b4_5.conv_branch2b1.weight"]
    w["fc8.weight"] = torch.zeros(20, 4096, 1, 1)
    w["b7.conv_branch1.weight"] = torch.zeros(4096, 1024, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(w, path)
    with pytest.raises(DataError) as e:
        create_backbone(BackboneConfig(name="resnet38d", pretrained=False, weights=str(path)))
    msg = str(e.value)
    assert "missing keys: b4_5.conv_branch2b1.weight" in msg and "unexpected keys: fc8.weight" in msg
    assert "b7.conv_branch1.weight (4096, 1024, 1, 1) != (4096, 2048, 1, 1)" in msg


# ------------------------------------------------------------------------------------------ normalisation


def test_normalisation_comes_from_the_backbone():
    assert backbone_normalisation("vit_base_patch16_224.orig_in21k_ft_in1k") == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_normalisation("deit_small_patch16_224.fb_in1k") == (IMAGENET_MEAN, IMAGENET_STD)
    for offline in ("mobilenetv2_imagenet", "hybrid_vit_mobilenetv2", "resnet38d", "no_such_net_xyz"):
        assert backbone_normalisation(offline) == (IMAGENET_MEAN, IMAGENET_STD)
    vit = load_config(None, ["model.backbone.name=vit_base_patch16_224.orig_in21k_ft_in1k"])
    assert (vit.data.mean, vit.data.std) == ([0.5] * 3, [0.5] * 3)
    assert type(vit.data.mean) is list  # resolved: the run's config.yaml records the numbers
    set_mean = load_config(None, ["model.backbone.name=vit_base_patch16_224.orig_in21k_ft_in1k", "data.mean=[0.1,0.2,0.3]"])
    assert (set_mean.data.mean, set_mean.data.std) == ([0.1, 0.2, 0.3], [0.5] * 3)  # explicit wins


def test_demo_normalisation_unchanged():
    for preset in ("demo/cam_cnn", "demo/usage_cnn", "demo/cam_vit", "demo/tkp_pcl"):
        cfg = load_config(preset)
        assert (cfg.data.mean, cfg.data.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), preset
    assert DataConfig().mean == [0.485, 0.456, 0.406] and Config().data.std == [0.229, 0.224, 0.225]
