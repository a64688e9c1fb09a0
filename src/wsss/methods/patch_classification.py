"""Patch classification: ViT-PCM (max pooling) and TKP-PCL (top-K pooling + patch contrastive error).

Every patch of the backbone's grid is classified over background + C classes (softmax Z); image scores
pool Z over patches (max: ViT-PCM; top-K mean: TKP-PCL; adaptive: APC-style, see wsss.pooling).
Loss = L_MCE + w_ET * L_ET + w_PCE * L_PCE + 0.5 * wd * ||W_classifier||^2 (see docs / METHODS.md).

Choices the papers leave open, made here:
- `k`: the config stores a float; k >= 1 is a patch count (k = 1 is max pooling), 0 < k < 1 a fraction.
- ET: one random transform per batch (all images share it); the main plain-view pass gives L_MCE and
  L_PCE, a no-grad eval-mode teacher pass on the plain view and a student pass on the transformed
  view give L_ET (so ET costs one extra forward and one extra forward+backward; none when w_ET = 0).
  ViT-PCM's own view (`et.per_sample`, `et.crop_size`, `et.view_size`, `et.mosaic`): a transform per
  image; with p_crop a crop_size-pixel square at a patch-aligned position; every view resized to
  view_size; mosaic x mosaic views tiled into one student input (ViT-PCM: four 192-px views in a 384-px
  2 x 2 mosaic, the pretrained input size), its output split back into the views before the loss.
  Empty tiles of the last mosaic (batch not a multiple of mosaic^2) are the mean colour and take no part.
- PCE: the pseudo-class probability is Z itself (not renormalised over the present classes), so
  `confidence` reads as a plain softmax probability; pairs are taken across the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.losses import (
    GridTransform,
    equivariance_loss,
    equivariance_target,
    mce_loss,
    pce_loss,
    sample_transform,
    select_pce_patches,
    warp_maps,
)
from wsss.methods.base import Method, tag_hits
from wsss.pooling import adaptive_topk_pool, topk_pool

POOLINGS = ("max", "topk", "adaptive")
BACKGROUNDS = ("learned", "bias")


# Kept out of torch.compile's graph: its flips and transpose are Python bools, and a graph per combination
# (per image with et.per_sample) hit dynamo's recompile limit on the GPU. On the CPU (toy ViT, VOC recipe,
# 16 compiled steps) 33 graphs -> 24 and dynamo's time 40 -> 25 s; the warp itself is cheap in eager.
@torch.compiler.disable
def _to_view(x: torch.Tensor, t: GridTransform, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] images or maps through `t` (box in x's units): crop, resize to `size` (bilinear), then
    h-flip, v-flip, transpose (`warp_maps`' order, with the view's own size)."""
    if t.crop is not None:
        top, left, ch, cw = t.crop
        x = x[..., top : top + ch, left : left + cw]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return warp_maps(x, GridTransform(t.hflip, t.vflip, t.transpose))


@dataclass
class ETConfig:
    weight: float = 0.0  # w_ET; 0 turns the equivariance loss off
    p_flip: float = 0.5  # each of h-flip, v-flip, transpose
    p_crop: float = 0.3  # a patch-aligned crop resized back
    # ViT-PCM's view (docs/recipes.md); the defaults keep one transform per batch at the input's size
    per_sample: bool = False  # a transform of its own for every image (else one for the whole batch)
    crop_size: int = 0  # > 0: the crop is this many pixels square (a multiple of the stride); 0: 50-99% a side
    view_size: int = 0  # > 0: every view, cropped or not, resized to this square (a multiple of the stride)
    mosaic: int = 1  # > 1: views tiled mosaic x mosaic into one student input (needs view_size)


@dataclass
class PCEConfig:
    weight: float = 0.0  # w_PCE; 0 turns the patch contrastive error off
    confidence: float = 0.5  # patches whose pseudo-class probability exceeds this take part
    margin: float = 0.0  # different-class pairs are penalised above this cosine similarity
    max_patches: int = 1024  # patches sampled per batch to bound the pairwise memory
    warmup_epochs: int = 0  # epochs without PCE
    # > 0: PCE acts only in epochs after one whose `tag_hit` (the trainer's per-epoch figure: the batches'
    # top class is a tag) is at least this far from `tag_chance` to 1 (0.5 is the collapse alarm's bar,
    # wsss.diagnostics.RECOGNISED_GAIN), and stops again when it falls below. PCE pulls together the
    # patches the classifier itself is confident about; before it tells the classes apart that groups the wrong
    # patches and holds recognition back (held-out ten-digit F1: MCE 0.29 after 18 epochs with PCE from
    # epoch 2 against 0.11 without; benchmarks/RESULTS.md, "Transfer"). 0: off (the paper's schedule).
    # A run the trainer extends (train.extend_unrecognised) starts its extra schedule unrecognised, so PCE
    # waits there for an epoch that passes again, not for the lr's restart.
    after_recognition: float = 0.0
    # > 0: PCE acts on a small projection (1x1 conv, ReLU, 1x1 conv to this many channels) of the patch
    # embeddings instead of on the embeddings themselves, as contrastive methods do (SimCLR's projection
    # head): pulling every background patch of a batch onto one point directly in the classifier's input
    # space cost mIoU on the demo (see benchmarks/RESULTS.md); through a projection it shapes the features
    # without collapsing them. 0 = the paper's literal form.
    projection_dim: int = 0


@dataclass
class PatchClassificationConfig:
    name: str = "patch_classification"
    pooling: str = "topk"  # max | topk | adaptive
    k: float = 0.1  # top-K: an int count (>= 1) or a fraction of patches in (0, 1); 1 = max pooling
    # > 0: the background's image score is the mean of its top `bg_k` patches (a count >= 1 or a fraction)
    # instead of the classes' pooling. With the same top-K as the classes, "always present" is all that
    # defines the background, and when every image holds objects of one kind (digits) the objects are
    # always present too: the background channel then fires on them (benchmarks/RESULTS.md, "Transfer").
    # A large bg_k asks the background to win a large share of every image, so the classes cannot take
    # background far from any object (held-out cluttered images: most false positives lay there), but where
    # every image is mostly objects of one kind it can take the objects instead (a swap). 0 (the classes'
    # pooling, as in the papers) in every preset; configs/demo/vit_pcm.yaml has the numbers.
    bg_k: float = 0.0
    # How the background's per-patch logit is made. "learned": a classifier row like any class (ViT-PCM).
    # "bias": one learned scalar shared by every patch, so a patch is background when no class is
    # confident there; the background can no longer learn a look of its own (the objects, issue 21).
    background: str = "learned"
    adaptive_ratio: float = 0.5  # pooling=adaptive: positions >= ratio * max are averaged
    hv_bilstm: bool = False
    hv_bilstm_init: str = "torch"  # torch: nn.LSTM's uniform +-1/sqrt(h); keras: Keras' LSTM defaults (ViT-PCM)
    dropout: float = 0.2
    classifier_weight_decay: float = 0.01  # L2 on the classifier (added to the loss)
    classifier_init_std: float = 0.0  # > 0: classifier weights ~ N(0, std^2) (ViT-PCM: 0.05); 0: torch's default
    et: ETConfig = field(default_factory=ETConfig)
    pce: PCEConfig = field(default_factory=PCEConfig)


class HVBiLSTM(nn.Module):
    """ViT-PCM's HV-BiLSTM: a bidirectional LSTM along each row and one along each column of the grid,
    D/4 hidden units per direction, the four outputs concatenated back to D channels."""

    def __init__(self, dim: int, init: str = "torch"):
        super().__init__()
        hidden = max(1, dim // 4)
        self.out_channels = 4 * hidden
        self.rows = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        if init == "keras":
            self._keras_init(hidden)

    def _keras_init(self, hidden: int) -> None:
        """Keras' LSTM defaults (ViT-PCM is Keras): glorot-uniform input kernel, orthogonal recurrent kernel,
        zero bias but 1 on the forget gate. Both frameworks order the gates i, f, g/c, o; torch's two biases
        add up, so the forget 1 goes on one of them."""
        for lstm in (self.rows, self.cols):
            for name, p in lstm.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                else:
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        with torch.no_grad():
                            p[hidden : 2 * hidden] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B, 4*hidden, h, w]
        b, d, h, w = x.shape
        t = x.permute(0, 2, 3, 1)  # [B, h, w, D]
        rows, _ = self.rows(t.reshape(b * h, w, d))
        cols, _ = self.cols(t.transpose(1, 2).reshape(b * w, h, d))
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1).permute(0, 3, 1, 2)


def _check(cfg: PatchClassificationConfig) -> None:
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"method.pooling: unknown pooling {cfg.pooling!r} (known: {', '.join(POOLINGS)})")
    if cfg.pooling == "topk" and cfg.k <= 0:
        raise ConfigError(f"method.k: {cfg.k} must be > 0 (a count >= 1 or a fraction in (0, 1))")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"method.dropout: {cfg.dropout} must be in [0, 1)")
    if cfg.hv_bilstm_init not in ("torch", "keras"):
        raise ConfigError(f"method.hv_bilstm_init: unknown {cfg.hv_bilstm_init!r} (torch, keras)")
    if cfg.background not in BACKGROUNDS:
        raise ConfigError(f"method.background: unknown {cfg.background!r} (one of {', '.join(BACKGROUNDS)})")
    if cfg.bg_k < 0:
        raise ConfigError(f"method.bg_k: {cfg.bg_k} must be >= 0 (0: the classes' pooling)")
    if cfg.classifier_init_std < 0:
        raise ConfigError(f"method.classifier_init_std: {cfg.classifier_init_std} must be >= 0 (0: torch's default)")
    et = cfg.et
    if et.crop_size < 0 or et.view_size < 0 or et.mosaic < 1:
        raise ConfigError(f"method.et: crop_size {et.crop_size} and view_size {et.view_size} must be >= 0, "
                          f"mosaic {et.mosaic} >= 1")
    if et.mosaic > 1 and et.view_size <= 0:
        raise ConfigError("method.et.mosaic > 1 tiles views of one size: set method.et.view_size")


class PatchClassifier(Method):
    """ViT-PCM / TKP-PCL. Baseline ViT-PCM = `pooling: max`, `pce.weight: 0`. See the module docstring."""

    has_background = True

    def __init__(
        self, cfg: PatchClassificationConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None
    ):
        super().__init__(cfg, model_cfg, num_classes)
        _check(cfg)
        if backbone is None:  # injectable for tests
            from wsss.models import create_backbone

            backbone = create_backbone(model_cfg.backbone)
        self.backbone = backbone
        dim = backbone.out_channels
        self.bilstm = HVBiLSTM(dim, cfg.hv_bilstm_init) if cfg.hv_bilstm else None
        self.embed_dim = self.bilstm.out_channels if self.bilstm is not None else dim
        # a per-patch linear classifier without bias: a 1x1 conv on the grid
        learned_bg = cfg.background == "learned"
        self.classifier = nn.Conv2d(self.embed_dim, num_classes - (not learned_bg), kernel_size=1, bias=False)
        self.bg_logit = None if learned_bg else nn.Parameter(torch.zeros(1))
        if cfg.classifier_init_std > 0:  # Keras RandomNormal(stddev) (ViT-PCM); else torch's default init
            nn.init.normal_(self.classifier.weight, mean=0.0, std=cfg.classifier_init_std)
        stride = backbone.stride
        for key in ("crop_size", "view_size"):
            if getattr(cfg.et, key) % stride:
                raise ConfigError(f"method.et.{key}: {getattr(cfg.et, key)} must be a multiple of the backbone's "
                                  f"stride {stride} (views are cut and tiled on the patch grid)")
        proj = cfg.pce.projection_dim
        self.pce_projection = (
            nn.Sequential(
                nn.Conv2d(self.embed_dim, self.embed_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(self.embed_dim, proj, 1)
            )
            if cfg.pce.weight > 0 and proj > 0
            else None
        )

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, images: torch.Tensor, dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch embeddings E [B, D, h, w] before the classifier, logits [B, num_classes, h, w])."""
        p = self.cfg.dropout if dropout else 0.0
        x = F.dropout(self.backbone(images), p, self.training)
        if self.bilstm is not None:
            x = F.dropout(self.bilstm(x), p, self.training)
        logits = self.classifier(x)
        if self.bg_logit is not None:  # background = one scalar at every patch, before the class rows
            bg = self.bg_logit.to(logits.dtype).view(1, 1, 1, 1).expand(logits.shape[0], 1, *logits.shape[2:])
            logits = torch.cat([bg, logits], dim=1)
        return x, logits

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """Image scores [B, K] from per-patch probabilities [B, K, h, w] with the configured pooling."""
        flat = z.flatten(2)
        if self.cfg.pooling == "max":
            return self._bg_pool(flat, topk_pool(flat, 1))
        if self.cfg.pooling == "adaptive":
            return self._bg_pool(flat, adaptive_topk_pool(flat, self.cfg.adaptive_ratio))
        k = self.cfg.k
        scores = topk_pool(flat, int(round(k)) if k >= 1 else float(k))
        return self._bg_pool(flat, scores)

    def _bg_pool(self, flat: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Channel 0's score replaced by the mean of its top `bg_k` patches (see the config)."""
        bk = self.cfg.bg_k
        if bk <= 0:
            return scores
        bg = topk_pool(flat[:, :1], int(round(bk)) if bk >= 1 else float(bk))
        return torch.cat([bg, scores[:, 1:]], dim=1)

    @property
    def recognition_gain(self) -> float:
        """The bar the trainer sets `recognised` at (see `PCEConfig.after_recognition`)."""
        return self.cfg.pce.after_recognition if self.cfg.pce.after_recognition > 0 else super().recognition_gain

    def forward_losses(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        emb, logits = self._forward(images)
        z = logits.float().softmax(dim=1)
        present = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1).float()  # bg always present
        scores = self.pool(z)
        mce = mce_loss(scores, present)
        zero = mce.new_zeros(())

        et = zero
        if self.cfg.et.weight > 0:
            et = self._et_loss(images, present)
        pce = zero
        if self.cfg.pce.weight > 0 and epoch >= self.cfg.pce.warmup_epochs and (
                self.recognised or self.cfg.pce.after_recognition <= 0):
            c = self.cfg.pce
            feats = emb if self.pce_projection is None else self.pce_projection(emb)
            sel, cls = select_pce_patches(feats, z, present, c.confidence, c.max_patches)
            pce = pce_loss(sel, cls, c.margin)
        l2 = zero
        if self.cfg.classifier_weight_decay > 0:
            l2 = 0.5 * self.cfg.classifier_weight_decay * self.classifier.weight.float().pow(2).sum()
        loss = mce + self.cfg.et.weight * et + self.cfg.pce.weight * pce + l2
        return {"loss": loss, "mce": mce.detach(), "et": et.detach(), "pce": pce.detach(), "l2": l2.detach(),
                **tag_hits(scores.detach()[:, 1:], labels)}

    def _teacher(self, images: torch.Tensor) -> torch.Tensor:
        # Teacher: plain view, no grad, eval mode (no dropout, BN running stats); every submodule's mode
        # is restored as it was (the trainer may keep a frozen backbone in eval mode).
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                return self._forward(images, dropout=False)[1].float().softmax(dim=1)
        finally:
            for m, was in modes:
                m.training = was

    def _et_loss(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        c = self.cfg.et
        if c.per_sample or c.crop_size or c.view_size or c.mosaic > 1:
            return self._et_loss_views(images, present)
        teacher_z = self._teacher(images)
        t = sample_transform(*teacher_z.shape[-2:], self.cfg.et.p_flip, self.cfg.et.p_crop)
        student_logits = self._forward(warp_maps(images, t.scaled(self.backbone.stride)))[1]
        target = warp_maps(teacher_z, t)
        if target.shape[-2:] != student_logits.shape[-2:]:  # crop rounding at a partial border patch
            target = F.interpolate(
                target, size=student_logits.shape[-2:], mode="bilinear", align_corners=False
            )
        return equivariance_loss(student_logits, equivariance_target(target, present))

    def _sample_view(self, h: int, w: int) -> GridTransform:
        """One view's transform on the h x w teacher grid (crop box in grid cells)."""
        c = self.cfg.et
        if c.crop_size <= 0:
            return sample_transform(h, w, c.p_flip, c.p_crop)
        r = torch.rand(4).tolist()
        crop = None
        if r[3] < c.p_crop:
            k = min(c.crop_size // self.backbone.stride, h, w)
            top = int(torch.randint(0, h - k + 1, ()).item())
            left = int(torch.randint(0, w - k + 1, ()).item())
            crop = (top, left, k, k)
        return GridTransform(r[0] < c.p_flip, r[1] < c.p_flip, r[2] < c.p_flip, crop)

    def _et_loss_views(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """L_ET with per-image views, resized to view_size and tiled into mosaics (see the module doc)."""
        c, stride = self.cfg.et, self.backbone.stride
        teacher_z = self._teacher(images)
        b, gh, gw = teacher_z.shape[0], *teacher_z.shape[-2:]
        if c.per_sample:
            transforms = [self._sample_view(gh, gw) for _ in range(b)]
        else:
            transforms = [self._sample_view(gh, gw)] * b
        size = (c.view_size, c.view_size) if c.view_size else tuple(images.shape[-2:])
        grid = (c.view_size // stride, c.view_size // stride) if c.view_size else (gh, gw)
        views = [_to_view(images[i : i + 1], t.scaled(stride), size) for i, t in enumerate(transforms)]
        targets = [_to_view(teacher_z[i : i + 1], t, grid) for i, t in enumerate(transforms)]
        logits = self._student_views(views)
        losses = []
        for lg, tg, pr in zip(logits, targets, present.split(1), strict=True):
            if tg.shape[-2:] != lg.shape[-2:]:  # a partial border patch
                tg = F.interpolate(tg, size=lg.shape[-2:], mode="bilinear", align_corners=False)
            losses.append((lg, equivariance_target(tg, pr)))
        return equivariance_loss(torch.cat([lg for lg, _ in losses]), torch.cat([tg for _, tg in losses]))

    def _student_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student logits [1, K, g, g] for each view [1, 3, H, W]: tiled into mosaics, or batched by shape."""
        k = self.cfg.et.mosaic
        if k > 1:
            v = views[0].shape[-1]
            per = k * k
            n = -(-len(views) // per)
            canvas = views[0].new_zeros((n, 3, k * v, k * v))  # 0 = the mean colour after normalisation
            for i, x in enumerate(views):
                m, j = divmod(i, per)
                r, col = divmod(j, k)
                canvas[m, :, r * v : (r + 1) * v, col * v : (col + 1) * v] = x[0]
            out = self._forward(canvas)[1]
            g = out.shape[-1] // k
            return [out[m : m + 1, :, r * g : (r + 1) * g, col * g : (col + 1) * g]
                    for m, j in (divmod(i, per) for i in range(len(views))) for r, col in [divmod(j, k)]]
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(views):
            by_shape.setdefault(tuple(x.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(views)
        for idx in by_shape.values():
            lg = self._forward(torch.cat([views[i] for i in idx]))[1]
            for j, i in enumerate(idx):
                out[i] = lg[j : j + 1]
        return out

    # --------------------------------------------------------------------------------------- inference

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Z [B, num_classes, h, w]: per-patch softmax, channel 0 the background (no dropout)."""
        return self._forward(images, dropout=False)[1].float().softmax(dim=1)

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled foreground scores [B, C] in [0, 1]."""
        return self.pool(self.class_maps(images))[:, 1:]
