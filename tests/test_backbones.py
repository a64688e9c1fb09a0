"""Backbones: shapes, strides, blocks, offline weights, local weights files. Tiny inputs, no downloads."""

import pytest
import torch

from wsss.config import BackboneConfig
from wsss.io import DataError
from wsss.models.backbones import BACKBONES, create_backbone, mobilenetv2_weights_path


def _covers_all(backbone) -> bool:
    ids = [id(p) for b in backbone.blocks() for p in b.parameters()]
    return len(ids) == len(set(ids)) and set(ids) == {id(p) for p in backbone.parameters()}


@pytest.mark.parametrize(
    "name, os_, kind, channels",
    [
        ("mobilenetv2_imagenet", 16, "cnn", 320),
        ("mobilenetv2_imagenet", 8, "cnn", 320),
        ("hybrid_vit_mobilenetv2", 16, "transformer", 192),
        ("resnet18", 16, "cnn", 512),
        ("resnet18", 8, "cnn", 512),
        ("vit_tiny_patch16_224", 16, "transformer", 192),
        ("deit_tiny_distilled_patch16_224", 16, "transformer", 192),  # two prefix tokens dropped
    ],
)
def test_shapes_strides_blocks(name, os_, kind, channels):
    torch.manual_seed(0)
    b = create_backbone(BackboneConfig(name=name, pretrained=False, output_stride=os_, img_size=224))
    assert (b.kind, b.out_channels) == (kind, channels)
    assert b.stride == (os_ if kind == "cnn" else 16)
    b.eval()
    with torch.no_grad():
        for h, w in [(64, 96), (72, 72)]:  # 72 is not a multiple of 16: grid = ceil(H / stride)
            y = b(torch.randn(1, 3, h, w))
            assert y.shape == (1, channels, -(-h // b.stride), -(-w // b.stride))
            assert torch.isfinite(y).all()
    assert _covers_all(b)
    assert len(b.blocks()) >= 4


def test_hybrid_stem_is_a_block_of_its_own():
    """"Train the last N blocks" can freeze the hybrid's pretrained CNN stem alone."""
    b = create_backbone(BackboneConfig(name="hybrid_vit_mobilenetv2", pretrained=False))
    blocks = b.blocks()
    assert blocks[0] is b.model.patch_embed.backbone
    assert len(blocks) == 2 + len(b.model.blocks)  # stem, embedding group, blocks (last one with the norm)
    assert not any(p is q for p in blocks[1].parameters() for q in blocks[0].parameters())


def test_vit_position_embeddings_are_interpolated():
    b = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False)).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        y = b(x)
        # shifting the image content must change every token (position embeddings are added per position)
        assert y.shape[-2:] == (6, 6)
        assert not torch.allclose(y, b(torch.zeros_like(x)))


def test_offline_mobilenetv2_loads_packaged_weights():
    assert "mobilenetv2_imagenet" in BACKBONES and "hybrid_vit_mobilenetv2" in BACKBONES
    file_sd = torch.load(mobilenetv2_weights_path(), weights_only=True)
    b = create_backbone(BackboneConfig(name="mobilenetv2_imagenet", pretrained=True)).eval()
    assert torch.equal(b.model[0][0].weight, file_sd["features.0.0.weight"])
    # a later tensor, whose name differs between the file and torchvision (mapped in order)
    assert torch.equal(b.model[17].conv[2].weight, file_sd["features.17.conv.6.weight"])

    from skimage import data
    from torchvision.transforms.functional import normalize, resize, to_tensor

    img = normalize(to_tensor(data.chelsea()), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    x = resize(img, [96, 128], antialias=True)[None]
    with torch.no_grad():
        y = b(x)
        rand = create_backbone(BackboneConfig(name="mobilenetv2_imagenet", pretrained=False)).eval()(x)
    assert y.shape == (1, 320, 6, 8) and torch.isfinite(y).all()
    # non-degenerate: features vary across positions and channels, and differ from a random init
    assert y.std(dim=(2, 3)).mean() > 0.1 and y.std(dim=1).mean() > 0.1
    assert not torch.allclose(y, rand, atol=1e-2)

    hybrid = create_backbone(BackboneConfig(name="hybrid_vit_mobilenetv2", pretrained=True))
    stem = hybrid.model.patch_embed.backbone
    assert torch.equal(stem[0][0].weight, file_sd["features.0.0.weight"])
    assert len(stem) == 14 and stem[13].conv[-1].num_features == 96


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    a = create_backbone(BackboneConfig(name="resnet18", pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ya = a(x)
    # a raw state_dict of the inner model, and the Backbone's own state dict wrapped as {"model": ...}
    torch.save(a.model.state_dict(), tmp_path / "raw.pt")
    torch.save({"model": a.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for f in ("raw.pt", "wrapped.pt"):
        torch.manual_seed(1)
        b = create_backbone(
            BackboneConfig(name="resnet18", pretrained=True, weights=str(tmp_path / f))
        ).eval()
        with torch.no_grad():
            assert torch.allclose(b(x), ya)


def test_weights_file_vit_resamples_position_embedding(tmp_path):
    a = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, img_size=224))
    torch.save(a.model.state_dict(), tmp_path / "vit.pt")
    b = create_backbone(
        BackboneConfig(
            name="vit_tiny_patch16_224", pretrained=False, img_size=96, weights=str(tmp_path / "vit.pt")
        )
    )
    assert b.model.pos_embed.shape[1] == 1 + 36
    assert torch.equal(b.model.blocks[0].attn.qkv.weight, a.model.blocks[0].attn.qkv.weight)


def test_weights_file_that_does_not_match_names_the_file(tmp_path):
    torch.save({"state_dict": {"foo.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt"):
        create_backbone(BackboneConfig(name="resnet18", pretrained=False, weights=str(tmp_path / "other.pt")))


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone(BackboneConfig(name="resnet18x", pretrained=False))
