"""CAM seeds: plain CAM (global average pooling) and USAGE (temperature generation loss + EMA teacher
regularisation), for CNN and Transformer backbones.

A 1x1 convolution without bias on the backbone's feature grid gives the activation maps
A [B, C, h, w] over the C = num_classes - 1 foreground classes; seeds are ReLU(A) (`class_maps`).

How USAGE (Peng et al., 2023) maps to this code:

- Generation loss (USAGE Sec. 4.1) -> `generation_loss`: s_c = sum_i softmax_i(A_c,i / tau) * A_c,i
  (`wsss.pooling.temperature_pool`), then the multilabel soft-margin loss of s against the tags.
  `tau = inf` is GAP, i.e. the plain CAM baseline; small tau > 0 approaches max pooling; tau < 0 weights
  the weakest positions (towards min pooling).
- Temperature form (`method.tau_mode`). With alpha = softmax(A / tau) and s = sum_i alpha_i A_i, the
  gradient is ds/dA_i = alpha_i (1 + (A_i - s) / tau). For tau < 0 it is negative wherever
  A_i > s + |tau|: on raw, unbounded logits the peak of the object soon lies more than |tau| above the
  score, so the loss that should raise the score lowers the object's peak and lifts the weakest
  (background) positions. `plain` is that literal form, kept for the ablation. `scaled` divides by the
  maps' own spread: alpha = softmax(A / (tau * sd(A).detach())), sd over the spatial positions of each
  map, so the temperature is measured in standard deviations: the weights do not change when A is
  multiplied by c > 0 (s(cA) = c s(A)), and the gradient turns negative only at positions more than
  |tau| standard deviations above the score, which a few outliers reach at most (the largest z-score of
  N values is below sqrt(N - 1)). The sd is detached: it sets the temperature, not a training signal.
- Regularisation loss (USAGE Sec. 4.2) -> `regularisation_loss`: the same image goes through the
  trained network (the student) with strong network adjustment (`reg.student_drop`) and through an EMA
  copy of it (the teacher, `reg.ema`, updated in `after_step`) with weak adjustment (`reg.teacher_drop`).
  L_REG = sum over present classes of KL(alpha_teacher_c || alpha_student_c), alpha_c the spatial softmax
  of A_c; the teacher side is stop-gradient and optionally sharpened (`reg.teacher_tau`). Its temperature
  `reg.tau` (0 = auto) inherits the generation tau only when that is finite and positive, else it is
  1: USAGE's figure draws the teacher's softmax without a temperature, and a negative generation tau
  would turn the compared distributions upside down (peaks weighted least).
  Total: L = L_GEN + reg.weight * L_REG.

The "deterministic principle": the sign and size of tau are fixed by the backbone kind, not searched per
dataset. CNN CAMs under-activate (only the most discriminative part fires): tau < 0 makes the score
depend on the weakest positions, so the loss pushes activation out over the whole object and the seeds
expand. Transformer CAMs over-activate (attention spreads onto background): a small tau > 0 makes the
score max-like, so only the peak needs to fire and the seeds shrink. `default_tau(kind)` holds the values
per kind; the demo's tau sweep in benchmarks/RESULTS.md says where the principle held there.

Network adjustment: the student's feature grid goes through element-wise dropout at the adjustment rate
(every backbone supports this), and every `DropPath` module inside the backbone (timm's stochastic
depth) has its `drop_prob` set to the same rate for that forward, then restored. Backbones without
DropPath modules (CNNs without residual drop-path, or timm models built with `drop_path_rate: 0`, where
timm puts `nn.Identity` in their place) get feature dropout only; build them with
`model.backbone.drop_path_rate > 0` to get drop-path adjustment too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError
from wsss.methods.base import Method
from wsss.pooling import spatial_softmax, temperature_pool, topk_pool

#: tau per backbone kind (deterministic principle) for the paper-scale recipes. Transformer: the demo's tau
#: sweep (benchmarks/RESULTS.md) confirms the sign and fixes the size (4). CNN: the paper's sign; the demo's
#: CNN over-activates at its test scales and is best at tau >= 1 (its preset says so), so -4 is unconfirmed.
DEFAULT_TAU = {"cnn": -4.0, "transformer": 4.0}


def default_tau(kind: str) -> float:
    """USAGE's generation temperature for a backbone kind: < 0 expands (under-activating) CNN seeds, a
    small > 0 shrinks (over-activating) Transformer seeds."""
    if kind not in DEFAULT_TAU:
        raise ValueError(f"unknown backbone kind {kind!r} (known: {', '.join(DEFAULT_TAU)})")
    return DEFAULT_TAU[kind]


@dataclass
class RegConfig:
    weight: float = 0.0  # w_REG; 0 turns the teacher/student regularisation off (no teacher is built)
    student_drop: float = 0.5  # strong network adjustment (dropout / drop-path) for the student
    teacher_drop: float = 0.1  # weak adjustment for the teacher
    ema: float = 0.999  # teacher = EMA of the student
    teacher_tau: float = 1.0  # sharpening of the teacher's distribution: a multiplier of the REG
    #                           temperature (1 = same as the student, < 1 sharper)
    tau: float = 0.0  # temperature of the compared spatial distributions; 0 (auto): the generation tau
    #                   when finite and > 0, else 1.0 (GAP has no spatial distribution to compare, and a
    #                   negative generation tau is never inherited); the paper presets set 1 explicitly
    drop_path: bool = True  # also set the backbone's DropPath modules to the adjustment rates
    teacher_maps: bool = False  # class_maps / image_scores from the EMA teacher instead of the student
    teacher_amp: str = "off"  # the teacher's forward in bf16: "bf16", "auto" (bf16 where the device computes
    #                           it natively: CUDA with bf16, CPUs with AVX512-BF16 / AMX) or "off" (the
    #                           trainer's precision, train.amp). Its output is a stop-gradient target of a
    #                           spatial softmax, where bf16's 3 digits change L_REG by ~1e-4 (RESULTS.md)


@dataclass
class CAMConfig:
    name: str = "cam"
    tau: float = math.inf  # generation temperature: inf = GAP (plain CAM), > 0 towards max, < 0 towards min
    tau_mode: str = "plain"  # plain: softmax(A / tau) on the raw maps (the literal form, for the ablation);
    #                          scaled: softmax(A / (tau * sd(A).detach())), tau in standard deviations of
    #                          each map (bounded, scale-free: see the module docstring)
    drop: float = 0.0  # dropout on the feature grid before the classifier in training (when REG is on,
    #                    the student uses reg.student_drop instead)
    absent_k: float = 0.0  # > 0: the classes the tags rule out are scored by the mean of their top
    #                        absent_k fraction of positions instead of the generation pool (0: off, the
    #                        papers' form). Why: under GAP a false region of an absent class that covers a
    #                        few positions (a distractor shaped like an object) moves its score by a few
    #                        hundredths, so the loss hardly pushes it down; its peak moves the score fully
    #                        (see generation_loss). Not adopted: 0.1 cost the four CAM / USAGE presets 4 to
    #                        45 points on the tuning data, removing look-alike classes whole (rule 16)
    reg: RegConfig = field(default_factory=RegConfig)


TAU_MODES = ("plain", "scaled")


def generation_scores(maps: torch.Tensor, tau: float, tau_mode: str = "plain") -> torch.Tensor:
    """s [B, C] = sum_i softmax_i(A_i / t) * A_i over the positions of maps [B, C, h, w] (or [B, C, N]);
    t = tau (`plain`) or tau * sd(A).detach() per map (`scaled`; GAP either way for tau = inf)."""
    x = maps.flatten(2).float()
    if tau_mode == "plain" or math.isinf(tau):
        return temperature_pool(x, tau)
    if tau_mode != "scaled":
        raise ValueError(f"tau_mode: one of {', '.join(TAU_MODES)}, got {tau_mode!r}")
    sd = x.detach().std(dim=-1, keepdim=True) if x.shape[-1] > 1 else torch.ones_like(x[..., :1])
    weights = torch.softmax(x / (tau * sd.clamp_min(1e-6)), dim=-1)
    return (weights * x).sum(-1)


def generation_loss(
    maps: torch.Tensor, labels: torch.Tensor, tau: float, tau_mode: str = "plain", absent_k: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_GEN and the scores s [B, C] for activation maps [B, C, h, w] (or [B, C, N]).

    `absent_k` > 0: a class absent from an image (label 0) is scored by the mean of its top `absent_k`
    fraction of positions (`topk_pool`), a present one by the generation pool as before. The present
    classes' extent is what tau shapes; an absent class should be low everywhere, so its highest positions
    are the ones to push down. Off in every preset: the push outweighs the present classes' pull (RESULTS.md,
    "Transfer", rule 16)."""
    scores = generation_scores(maps, tau, tau_mode)
    if absent_k > 0:
        peaks = topk_pool(maps.flatten(2).float(), float(absent_k))
        scores = torch.where(labels > 0.5, scores, peaks)
    return F.multilabel_soft_margin_loss(scores, labels.float()), scores


def regularisation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float, teacher_tau: float = 1.0
) -> torch.Tensor:
    """L_REG: sum over present classes of KL(alpha_teacher_c || alpha_student_c), mean over the batch.

    `student`, `teacher`: activation maps [B, C, h, w]; the teacher's are detached here."""
    s = student.flatten(2).float()
    t = teacher.detach().flatten(2).float()
    log_s = torch.log_softmax(s / tau, dim=-1)  # = log spatial_softmax(s, tau), without underflow
    p_t = spatial_softmax(t, tau * teacher_tau)
    kl = F.kl_div(log_s, p_t, reduction="none").sum(-1)  # [B, C]; xlogy handles p_t = 0
    present = (labels > 0.5).to(kl.dtype)
    return (kl * present).sum() / max(kl.shape[0], 1)


def _stochastic(module: nn.Module) -> bool:
    """Holds a DropPath (its rate is set per forward, see `drop_path_rate`) or an active dropout."""
    return any(type(m).__name__ == "DropPath" or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
               for m in module.modules())


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module], outputs: dict[int, object]):
    """Store each module's forward output in `outputs[position]` while the context is open."""
    hooks = [m.register_forward_hook(lambda _m, _a, out, k=k: outputs.__setitem__(k, out))
             for k, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def replay_outputs(modules: list[nn.Module], outputs: dict[int, object]):
    """Make each module return `outputs[position]` without computing anything (all of them, not only the
    last: code between the modules, e.g. a ViT's position embedding, runs on the real tensors)."""
    for k, m in enumerate(modules):
        m.forward = lambda *a, k=k, **kw: outputs[k]
    try:
        yield
    finally:
        for m in modules:
            del m.forward  # the class's forward again


@contextlib.contextmanager
def drop_path_rate(module: nn.Module, rate: float):
    """Temporarily set every DropPath (timm stochastic depth) inside `module` to `rate`; yields how many."""
    mods = [m for m in module.modules() if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob")]
    old = [m.drop_prob for m in mods]
    for m in mods:
        m.drop_prob = rate
    try:
        yield len(mods)
    finally:
        for m, p in zip(mods, old, strict=True):
            m.drop_prob = p


class CAMMethod(Method):
    """CAM / USAGE. Baseline CAM = `tau: inf`, `reg.weight: 0`. See the module docstring."""

    has_background = False

    def __init__(self, cfg: CAMConfig, model_cfg, num_classes: int, backbone: nn.Module | None = None):
        super().__init__(cfg, model_cfg, num_classes)
        _check(cfg)
        if backbone is None:  # injectable for tests; imported late so wsss.methods imports without it
            from wsss.models import create_backbone

            backbone = create_backbone(model_cfg.backbone)
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes - 1, kernel_size=1, bias=False)
        self.teacher: nn.ModuleDict | None = None
        if cfg.reg.weight > 0:  # the EMA teacher exists only when used: the baseline costs nothing extra
            self.teacher = nn.ModuleDict(
                {"backbone": copy.deepcopy(self.backbone), "classifier": copy.deepcopy(self.classifier)}
            )
            self.teacher.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ forward

    def _maps(self, net, images: torch.Tensor, drop: float) -> torch.Tensor:
        """Activation maps A [B, C, h, w] of `net` (self or the teacher) with `drop` network adjustment
        (dropout on the feature grid, and drop-path when enabled); drop only acts in training mode."""
        use_dp = self.training and drop > 0 and self.cfg.reg.drop_path
        with drop_path_rate(net.backbone, drop) if use_dp else contextlib.nullcontext():
            feats = net.backbone(images)
        feats = F.dropout(feats, drop, training=self.training and drop > 0)
        return net.classifier(feats)

    def _generation_loss(self, maps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return generation_loss(maps, labels, self.cfg.tau, self.cfg.tau_mode, self.cfg.absent_k)

    def _reg_tau(self) -> float:
        if self.cfg.reg.tau != 0:
            return self.cfg.reg.tau
        return self.cfg.tau if math.isfinite(self.cfg.tau) and self.cfg.tau > 0 else 1.0

    def forward_losses(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        reg_cfg = self.cfg.reg
        # One student forward serves both terms: with REG on, L_GEN is computed on the strongly adjusted
        # student, as in USAGE (the student is the network being trained).
        drop = reg_cfg.student_drop if self.teacher is not None else self.cfg.drop
        if self.teacher is None:
            maps = self._maps(self, images, drop)
            gen, _ = self._generation_loss(maps, labels)
            return {"loss": gen, "gen": gen, "reg": gen.new_zeros(())}
        # The teacher runs in the student's per-module modes: a BatchNorm the trainer froze (frozen
        # blocks, train.freeze_bn) is frozen in the teacher too, instead of normalising by the batch.
        for t_mod, s_mod in zip(self.teacher["backbone"].modules(), self.backbone.modules(), strict=True):
            t_mod.training = s_mod.training
        student_mods, teacher_mods = self._shared_prefix()
        outputs: dict[int, object] = {}
        with record_outputs(student_mods, outputs):
            maps = self._maps(self, images, drop)
        gen, _ = self._generation_loss(maps, labels)
        with torch.no_grad(), replay_outputs(teacher_mods, outputs), _teacher_autocast(reg_cfg.teacher_amp, images):
            t_maps = self._maps(self.teacher, images, reg_cfg.teacher_drop)
        reg = regularisation_loss(maps, t_maps, labels, self._reg_tau(), reg_cfg.teacher_tau)
        return {"loss": gen + reg_cfg.weight * reg, "gen": gen, "reg": reg}

    def _shared_prefix(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The modules (student's, teacher's) of the leading backbone blocks whose output the teacher takes
        from the student's forward instead of computing it: blocks that do not train (frozen by the trainer:
        `train.trainable_blocks`, the frozen warm-up; their teacher weights are copies, see `after_step`)
        and hold no dropout or drop-path, so both networks compute the same thing there."""
        from wsss.models.backbones import called_modules

        student, teacher = [], []
        for s_blk, t_blk in zip(self.backbone.blocks(), self.teacher["backbone"].blocks(), strict=True):
            if any(p.requires_grad for p in s_blk.parameters()) or _stochastic(s_blk):
                break
            student += called_modules(s_blk)
            teacher += called_modules(t_blk)
        return student, teacher

    def activation_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw A [B, C, h, w] without dropout (the teacher's when `reg.teacher_maps`)."""
        net = self.teacher if self.teacher is not None and self.cfg.reg.teacher_maps else self
        return self._maps(net, images, 0.0)

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.activation_maps(images))
        return torch.cat([torch.zeros_like(maps[:, :1]), maps], dim=1)  # no learned background

    def image_scores(self, images: torch.Tensor) -> torch.Tensor:
        # The sigmoid of the score the classifier was trained on (the training tau), so the probabilities
        # are the calibrated ones; GAP scores would be off-scale for tau != inf.
        return torch.sigmoid(generation_scores(self.activation_maps(images), self.cfg.tau, self.cfg.tau_mode))

    # ------------------------------------------------------------------------------------- parameters

    def head_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.backbone.parameters()}
        if self.teacher is not None:  # never optimised, whatever requires_grad says
            skip |= {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in skip and p.requires_grad]

    @torch.no_grad()
    def after_step(self) -> None:
        """teacher = ema * teacher + (1 - ema) * student; buffers (BatchNorm statistics) copied, and so are
        the weights that do not train (the EMA of a constant, without its rounding drift)."""
        if self.teacher is None:
            return
        d = self.cfg.reg.ema
        for name in ("backbone", "classifier"):
            student, teacher = getattr(self, name), self.teacher[name]
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                if s.requires_grad:
                    t.mul_(d).add_(s.detach(), alpha=1.0 - d)
                else:
                    t.copy_(s)
            for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
                t.copy_(s)


@functools.cache  # asked every training step; the hardware does not change
def native_bf16(device_type: str) -> bool:
    """The device computes bf16 matmuls / convolutions in hardware (else bf16 is emulated, slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _teacher_autocast(mode: str, images: torch.Tensor):
    if mode == "bf16" or (mode == "auto" and native_bf16(images.device.type)):
        return torch.autocast(images.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()  # the trainer's autocast, if any, stays in force


def _check(cfg: CAMConfig) -> None:
    r = cfg.reg
    if cfg.tau == 0 or math.isnan(cfg.tau):
        raise ConfigError(f"method.tau: must be non-zero (inf = GAP), got {cfg.tau}")
    if not 0.0 <= cfg.absent_k <= 1.0:
        raise ConfigError(f"method.absent_k: a fraction of positions in [0, 1] (0 = off), got {cfg.absent_k}")
    if cfg.tau_mode not in TAU_MODES:
        raise ConfigError(f"method.tau_mode: one of {', '.join(TAU_MODES)}, got {cfg.tau_mode!r}")
    for key, v in (
        ("drop", cfg.drop),
        ("reg.student_drop", r.student_drop),
        ("reg.teacher_drop", r.teacher_drop),
    ):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"method.{key}: a rate in [0, 1), got {v}")
    if not 0.0 <= r.ema <= 1.0:
        raise ConfigError(f"method.reg.ema: must be in [0, 1], got {r.ema}")
    if r.teacher_amp not in ("off", "bf16", "auto"):
        raise ConfigError(f"method.reg.teacher_amp: off, bf16 or auto, got {r.teacher_amp!r}")
    if r.weight < 0 or not r.teacher_tau > 0 or not math.isfinite(r.tau):
        raise ConfigError("method.reg: weight must be >= 0, teacher_tau > 0 and tau finite")
