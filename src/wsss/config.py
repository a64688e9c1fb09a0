"""Typed configuration: dataclasses filled from YAML with `_base_` inheritance and `key=value` overrides.

Why not OmegaConf: we need two things it does not give - an unknown key reported with the closest valid
key, and a `method` section whose schema depends on `method.name` (each method family owns its own
dataclass, see `wsss.methods`). Both take a hundred lines here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss.diagnostics import EXTEND_GAIN
from wsss.errors import ConfigError  # re-exported: callers import it from here

PRESET_DIR = Path(__file__).parent / "configs"




class FromBackbone(list):
    """A `data.mean` / `data.std` nobody set (ImageNet's numbers until resolved): `Config` replaces it by
    the backbone's normalisation (`wsss.data.transforms.backbone_normalisation`)."""


@dataclass
class DataConfig:
    root: str = ""
    format: str = "auto"  # auto | voc | coco | folder
    train_split: str = "train"
    val_split: str = "val"
    tags_file: str = ""  # folder format: CSV or JSON of tags (default: <root>/tags.csv or tags.json)
    crop_size: int = 224
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # random resize before the crop
    # short: the short side becomes s * crop_size (aspect kept), then a crop_size crop; long: the long
    # side does (SEAM's RandomResizeLong); native: the image at its own resolution x s (objects keep their
    # pixel size); square: the whole image is resized to (s * crop_size) squared (aspect not kept), so
    # s = 1 is the whole image, no crop
    resize: str = "short"
    # crop: the above (resize, crop, flips, jitter); timm: timm's ImageNet training pipeline with MCTformer's
    # values (RandomResizedCrop, RandAugment m9, random erasing 0.25; wsss.data.transforms), no masks
    augment: str = "crop"
    hflip: bool = True
    vflip: bool = False  # vertical flip, p = 0.5
    transpose: bool = False  # swap height and width (a 90-degree rotation up to a flip), p = 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off
    # Per-factor ranges [lo, hi] that replace color_jitter's 1 +- strength for that factor ([] = use it):
    # ViT-PCM's contrast 0.5-2.0 is not symmetric, and its brightness is ~off ([1, 1])
    brightness: list[float] = field(default_factory=list)
    contrast: list[float] = field(default_factory=list)
    saturation: list[float] = field(default_factory=list)
    hue: float = 0.0  # colour jitter's hue shift, at most this (0-0.5), 0 = off
    grey_p: float = 0.0  # probability of turning the image grey (after the jitter), 0 = off
    # Unset: the backbone's own normalisation (timm pretrained_cfg; ImageNet for the offline names), filled
    # in when the Config is built (so the run's config.yaml records it); set in a config: used as given.
    mean: list[float] = field(default_factory=lambda: FromBackbone([0.485, 0.456, 0.406]))
    std: list[float] = field(default_factory=lambda: FromBackbone([0.229, 0.224, 0.225]))
    num_workers: int = -1  # -1: chosen from the machine
    skip_bad: bool = False  # skip unreadable samples (listed in the run log) instead of stopping


@dataclass
class BackboneConfig:
    name: str = "mobilenetv2_100"  # a timm name or a wsss offline name (see wsss.models)
    pretrained: bool = True  # timm hub weights (online) or the packaged offline weights
    weights: str = ""  # a local weights file, loaded with weights_only=True; wins over `pretrained`
    img_size: int = 224  # ViTs: the size position embeddings are built for (interpolated at other sizes)
    output_stride: int = 16  # CNNs: the last stages are dilated to reach it
    drop_rate: float = 0.0  # timm's drop_rate: for ViTs the dropout before the (unused) classifier head
    drop_path_rate: float = 0.0
    # Dropout inside the backbone's blocks; [] = the architecture's own default. A ViT takes one value,
    # timm's proj_drop_rate (after the attention projection and after each MLP layer: vit_keras's
    # `dropout`, the original ViT's), default 0; resnet38d one per stage, Dropout2d in b6, b7 (default
    # 0.3, 0.5). Other backbones have none to set.
    dropout: list[float] = field(default_factory=list)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16  # global batch: split over processes under torchrun
    seed: int = 0
    optimizer: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3  # the head's learning rate
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this
    # After the frozen epochs (freeze_backbone_epochs > 0): the head's lr becomes this (the backbone's
    # this * backbone_lr_mult); 0 = train.lr throughout
    lr_after_freeze: float = 0.0
    # a fresh optimizer (no moments, step count 0) when the backbone starts training, as a
    # Keras recompile does (ViT-PCM); the lr schedule keeps running over the whole run
    reset_optimizer_after_freeze: bool = False
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    adam_eps: float = 1e-8  # adam / adamw epsilon (torch's default; Keras' is 1e-7)
    scheduler: str = "cosine"  # cosine | poly | constant
    warmup_epochs: float = 0.0  # linear lr warm-up
    warmup_lr: float = 0.0  # the warm-up starts from this lr (every group), 0: from 0 (timm's warmup_lr)
    min_lr: float = 0.0  # cosine / poly decay to this lr (every group) instead of 0 (timm's min_lr)
    # > 0: when, at the end of the lr schedule, the classifier does not yet pick the train images' tags
    # (the collapse alarm's check on its fixed train images, wsss.diagnostics, or the last epoch's batches
    # where the method logs `tag_hit`: top-scored class a tag under `extend_gain` of the way from chance
    # to always), training goes on for this many times `epochs` more, the lr schedule restarted from its
    # top over that length. A budget that fits the classes stops at `epochs` untouched; classes that take
    # longer to tell apart get (1 + this) x.
    extend_unrecognised: int = 0
    extend_gain: float = EXTEND_GAIN  # the bar above; the CAM presets stop at 0.6
    # The same count also on the first 32 images of the val split (their image-level tags; no pixel label),
    # which the classifier has not trained on: the train images can be remembered rather than recognised
    # (held-out ten-digit F1, CAM-CNN: the tags on top in 97% of the check's train images, 50% of val's).
    # Without a val split the trainer can use (one with masks), the train counts decide alone.
    extend_on_val: bool = False
    freeze_backbone_epochs: int = 0  # the backbone is frozen for these first epochs
    trainable_blocks: int = -1  # after the freeze: train only the last N backbone blocks (-1: all)
    freeze_bn: bool = False  # backbone BatchNorm in eval mode throughout (pretrained statistics, as IRN's
    #                          FixedBatchNorm): batch statistics of 8-16 images are noise, and the step no
    #                          longer depends on how the global batch is split over processes
    freeze_bn_affine: bool = False  # with freeze_bn: the BatchNorm weight and bias do not train either
    #                                 (PSA / SEAM: requires_grad False, left out of the optimizer)
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True  # under torchrun on GPU: BatchNorm statistics over the global batch (SyncBatchNorm;
    #                      torch has no CPU kernel for it, so CPU/gloo runs keep per-process statistics)
    grad_clip: float = 0.0  # max grad norm, 0 = off
    max_steps_per_epoch: int = 0  # 0 = the whole dataset
    val_every: int = 1  # epochs between val pseudo-mask mIoU (when the val split has masks); the last epoch
    #                   always; 0: never (no best.pt, the run's checkpoint is the last epoch's)
    log_every: int = 10  # steps
    tensorboard: bool = False  # RUN/tb/: per-step losses and lr, per-epoch val figures (rank 0; needs tensorboard)


@dataclass
class CRFConfig:
    # psa | vit_pcm | toco | custom (then the values below are used as given); postprocess/crf.py has them.
    # psa by default: the values most CAM papers reuse, and the ones the demo presets were tuned with.
    preset: str = "psa"
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    workers: int = -1  # CRF worker processes, -1: chosen from the machine
    backend: str = "auto"  # torch | pydensecrf | auto (pydensecrf when importable and on CPU, else torch)


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    size: int = 0  # resize the short side to this before inference (0: the crop size; -1: the image as it is)
    resize: str = "short"  # short / long: that side to `size` (aspect kept); square: the image to size x size;
    #                        native: the image as it is (size ignored)
    # where the kept classes' maps are normalised: full (each divided by its max after upsampling to the
    # image) | grid (ViT-PCM: at the feature grid, each pass's kept classes divided by their max, then
    # by their sum over classes, then upsampled and averaged)
    normalise: str = "full"
    # Methods with a background channel (patch classification): where the probability of the classes the
    # image's tags rule out goes. drop: discarded with their channels (ViT-PCM's restriction); background:
    # added to the background everywhere; won: added to the background at the patches where a ruled-out
    # class is the top class (the model calls the patch a class that, by the tags, is not there: clutter,
    # distractors). On large images with small objects and distractors the background channel holds under
    # half the mass on true background and the absent classes much of the rest (benchmarks/RESULTS.md,
    # "Transfer"); `background` also takes the absent mass on the objects themselves (recall falls).
    absent: str = "drop"
    bg_threshold: float = 0.3  # methods without a background class: background score
    bg_alpha: float = 0.0  # > 0: background = (1 - max_c A_c) ** alpha instead of the threshold
    bg_power: float = 1.0  # methods with a background channel: that channel ** p before the argmax (> 1: larger masks)
    # > 0: the masks' extent checked against the run's own classifier (wsss.engine.extent): where the masks of
    # the run's first `extent_images` tagged train images keep under this share of the classifier's score for
    # their classes, the knob (bg_threshold, or bg_power) moves to larger masks. 0: off. Once per checkpoint.
    extent_guard: float = 0.0
    # With the guard on: where those masks cover more than `extent_max_area` of the pixels on average (far
    # above the objects' share in VOC, COCO and the benchmark families; 0: the guard only grows), the knob moves
    # to the largest masks that cover at most `extent_target_area` (about VOC's objects' share; rule 25). Target
    # 0: the smallest masks that keep the guard's share of the score (rule 24), which lands on the grid's end,
    # as over-covering masks keep the whole score at any size.
    extent_max_area: float = 0.4
    extent_target_area: float = 0.25
    extent_images: int = 16
    crf: CRFConfig = field(default_factory=CRFConfig)

    def __post_init__(self) -> None:
        for key in ("extent_max_area", "extent_target_area"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"infer.{key}: a share of the pixels, 0-1; got {getattr(self, key)!r}")
        if self.extent_max_area > 0 and self.extent_target_area >= self.extent_max_area:
            raise ConfigError(f"infer.extent_target_area ({self.extent_target_area!r}) must be under "
                              f"infer.extent_max_area ({self.extent_max_area!r}), since the masks it shrinks cover "
                              f"more; set it lower, or 0 for the smallest masks that keep infer.extent_guard's share")


@dataclass
class PipelineConfig:
    """What `wsss run` chains after stage 1: the stage-1 preset names its downstream presets, so a VOC
    recipe is followed by the VOC stage 2 and a demo preset by the demo's."""
    segment: str = "demo/segment"  # the stage-2 config or preset trained on the train pseudo masks
    refine: str = ""  # an AffinityNet config or preset that refines the seeds before stage 2 ("": none)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the dataclass registered under method.name (wsss.methods)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # published numbers to compare with (`wsss run` prints them beside its own), e.g.
    # {pseudo_train_crf: 71.39, pseudo_val_crf: 69.32, source: "ViT-PCM README"}; mIoU in %
    reference: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.data
        if isinstance(d, DataConfig) and (isinstance(d.mean, FromBackbone) or isinstance(d.std, FromBackbone)):
            from wsss.data.transforms import backbone_normalisation

            mean, std = backbone_normalisation(self.model.backbone.name)
            d.mean = list(mean) if isinstance(d.mean, FromBackbone) else d.mean
            d.std = list(std) if isinstance(d.std, FromBackbone) else d.std

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data


def resolve_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file path, or a preset name such as `demo/tkp_pcl` from the packaged configs."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    stem = str(name).removesuffix(".yaml").removeprefix("configs/")
    candidates.append(PRESET_DIR / f"{stem}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{name}: no such config file or preset (presets: {', '.join(list_presets())})")


def list_presets() -> list[str]:
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def _deep_merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace_", False):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_replace_"} if isinstance(v, dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The merged mapping of a config file and its `_base_` chain (a path or list, relative to the file)."""
    path = resolve_path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `_base_` cycle through {' -> '.join(map(str, _seen))}")
    data = load_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_raw(resolve_path(b, path.parent), (*_seen, path.resolve())))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=3")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = value
    return raw


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check and convert one leaf value against its annotation (int -> float, scalar -> list...)."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for t in typing.get_args(typ):
            if t is type(None) and value is None:
                return None
            try:
                return _coerce(value, t, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {typ}")
    if origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "+inf", "-inf", ".inf", "-.inf"):
            return float(value.replace(".", ""))
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off / on (train.amp: off) as a boolean
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls: type, raw: dict, where: str = "") -> Any:
    """Fill dataclass `cls` from a mapping; unknown keys are errors that name the closest valid key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {valid})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = build_dataclass(typ, value or {}, full)
        elif key == "method" and cls is Config:
            kwargs[key] = build_method_config(value or {}, full)
        else:
            kwargs[key] = _coerce(value, typ, full)
    obj = cls(**kwargs)
    if cls is Config and obj.method is None:
        obj.method = build_method_config({}, "method")
    return obj


def build_method_config(raw: dict, where: str) -> Any:
    from wsss.methods import METHOD_CONFIGS  # each family registers its own dataclass

    raw = dict(raw)
    name = raw.get("name", "patch_classification")
    if name not in METHOD_CONFIGS:
        close = difflib.get_close_matches(str(name), list(METHOD_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}' at {where}.name{hint} (known: {', '.join(METHOD_CONFIGS)})")
    return build_dataclass(METHOD_CONFIGS[name], raw, where)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file (or preset name) with its `_base_` chain, apply `key=value` overrides."""
    raw = load_raw(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    try:
        return build_dataclass(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def config_from_dict(raw: dict) -> Config:
    return build_dataclass(Config, raw)


def save_config(cfg: Config, path: str | Path) -> None:
    from wsss.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
