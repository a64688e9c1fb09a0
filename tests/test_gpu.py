"""GPU checks (marked `gpu`, skipped without CUDA; `bash benchmarks/gpu_suite.sh` runs them first).

Each builds a paper preset with random weights (model.backbone.pretrained=false) at a reduced size and
compares two ways of computing the same training step. Stochastic parts (dropout, drop-path) are switched
off where both sides must see the same network, and TF32 is off for the fp32 references, so what is left
is the precision (or layout, or compiler) under test. Tolerances, stated once here:

- bf16 autocast vs fp32: loss within 3% relative (+ 1e-3), gradient direction cosine >= 0.99;
- channels_last vs contiguous (fp32): loss within 1e-3 relative, gradient cosine >= 0.999;
- torch.compile vs eager (fp32): loss within 1e-3 relative, gradient cosine >= 0.999, class maps within 1e-3;
- the EMA teacher in bf16 (`method.reg.teacher_amp: bf16`) vs fp32: L_REG within 5e-3 + 2% relative, the
  student's gradient cosine >= 0.995, the teacher's weights stay fp32 and move the same under the EMA;
- the torch dense CRF on CUDA vs on the CPU: >= 99.5% of the labels equal at VOC size.

The compile test comes last (it is the slowest: inductor compiles, and recompiles for ET's crops).
`WSSS_GPU_TESTS_ON_CPU=1` runs them on the CPU with the GPU suite's toy backbones (a check of the test code
itself, not of a GPU).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

ON_CPU = os.environ.get("WSSS_GPU_TESTS_ON_CPU") == "1"
DEV = torch.device("cpu" if ON_CPU else "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs CUDA"),
]

_TINY_VIT = ["model.backbone.name=test_vit", "model.backbone.img_size=64"]
_TINY_CNN = ["model.backbone.name=test_resnet", "model.backbone.dropout=[]"]
_TINY = {"vit": _TINY_VIT, "cnn": _TINY_CNN}
NO_DROP = {  # every stochastic part of each preset family off
    "patch_classification": ["method.dropout=0"],
    "cam": ["method.drop=0", "method.reg.student_drop=0", "method.reg.teacher_drop=0",
            "model.backbone.drop_path_rate=0"],
    "deeplab": [],
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references in true fp32 (TF32 convolutions / matmuls would be a precision change of their own)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _family(preset: str) -> str:
    return "cnn" if "resnet" in preset else "vit"


def build(preset: str, overrides=(), seed: int = 0, freeze: bool = True):
    """(method on DEV in train mode, its config): random weights, the recipe's trainable blocks and frozen
    BatchNorm as the trainer sets them, dropout / drop-path off."""
    from wsss.config import load_config
    from wsss.engine.trainer import _freeze_bn, _split_params
    from wsss.methods import create_method

    base = ["model.backbone.pretrained=false", "model.backbone.weights="]
    if ON_CPU:
        base += _TINY[_family(preset)]
    elif "resnet38d" in preset:
        base += ["model.backbone.dropout=[0,0]"]  # its Dropout2d in b6, b7
    cfg = load_config(preset, base)
    cfg = load_config(preset, [*base, *NO_DROP.get(cfg.method.name, []), *overrides])
    torch.manual_seed(seed)
    method = create_method(cfg, 21).to(DEV)
    if freeze:
        head, live, dead, dead_blocks = _split_params(method, cfg.train.trainable_blocks)
        for p in dead:
            p.requires_grad_(False)
        method.train()
        _freeze_bn(list(method.backbone_blocks()) if cfg.train.freeze_bn else dead_blocks)
    else:
        method.train()
    return method, cfg


def batch(method, size: int, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    if getattr(method, "target", "label") == "mask":
        y = torch.randint(0, 21, (n, size, size), generator=g)
        y[:, : size // 8] = 255
    else:
        y = (torch.rand(n, 20, generator=g) < 0.15).float()
        y[torch.arange(n), torch.randint(0, 20, (n,), generator=g)] = 1.0
    return x.to(DEV), y.to(DEV)


def step_grads(method, x, y, epoch: int, amp: torch.dtype | None = None, fwd=None, seed: int = 1):
    """(loss terms as floats, the flattened gradient of the trainable parameters) of one forward + backward."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same ET flips / crops, PCE sampling on both sides
    with torch.autocast(DEV.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = (method.forward_losses if fwd is None else fwd)(x, y, epoch)
    out["loss"].backward()
    grads = [p.grad.flatten().float() for p in method.parameters() if p.requires_grad and p.grad is not None]
    return {k: float(v.detach().float()) for k, v in out.items()}, torch.cat(grads)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _epoch(cfg) -> int:
    return max(cfg.train.epochs - 1, 0)  # every loss warm-up over: all terms on


def _size(cnn_size: int = 96) -> int:
    return 64 if ON_CPU else cnn_size


# ----------------------------------------------------------------------------------------- bf16 AMP


@pytest.mark.parametrize("preset", ["voc/tkp_pcl_vit_b16", "voc/usage_deit_s", "voc/usage_resnet38d",
                                    "voc/deeplab_v2_resnet101"])
def test_bf16_step_matches_fp32(preset):
    if ON_CPU and "vit_b16" in preset:
        pytest.skip("oneDNN has no bf16 LSTM (the HV-BiLSTM) on this CPU")
    method, cfg = build(preset)
    state = copy.deepcopy(method.state_dict())
    x, y = batch(method, _size(128 if _family(preset) == "vit" else 96))
    ref, g_ref = step_grads(method, x, y, _epoch(cfg))
    method.load_state_dict(state)
    low, g_low = step_grads(method, x, y, _epoch(cfg), amp=torch.bfloat16)
    assert np.isfinite(low["loss"])
    assert abs(low["loss"] - ref["loss"]) <= 0.03 * abs(ref["loss"]) + 1e-3, (low, ref)
    assert cosine(g_low, g_ref) >= 0.99


# ------------------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("preset", ["voc/usage_resnet38d", "voc/deeplab_v2_resnet101"])
def test_channels_last_matches_contiguous(preset):
    method, cfg = build(preset)
    state = copy.deepcopy(method.state_dict())
    x, y = batch(method, _size())
    ref, g_ref = step_grads(method, x, y, _epoch(cfg))
    method.load_state_dict(state)
    method = method.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    cl, g_cl = step_grads(method, xc, y, _epoch(cfg))
    assert abs(cl["loss"] - ref["loss"]) <= 1e-3 * abs(ref["loss"]) + 1e-5, (cl, ref)
    assert cosine(g_cl, g_ref) >= 0.999
    convs = [m for m in method.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4
             and m.weight.shape[-1] > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


# ------------------------------------------------------------------------------------ EMA teacher bf16


@pytest.mark.parametrize("preset", ["voc/usage_deit_s", "voc/usage_resnet38d"])
def test_ema_teacher_bf16_matches_fp32(preset):
    """reg.teacher_amp bf16: the teacher's forward runs in bf16 (its output is bf16), L_REG and the
    student's gradient match the fp32 teacher's, and the EMA keeps the teacher's weights fp32. The
    ResNet38d recipe freezes its first blocks: the teacher replays the student's outputs there."""
    ref_m, cfg = build(preset, ["method.reg.teacher_amp=off"])
    low_m, _ = build(preset, ["method.reg.teacher_amp=bf16"])
    low_m.load_state_dict(ref_m.state_dict())
    x, y = batch(ref_m, _size(64 if _family(preset) == "vit" else 96))
    seen = []
    hook = low_m.teacher["classifier"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref, g_ref = step_grads(ref_m, x, y, _epoch(cfg))
    low, g_low = step_grads(low_m, x, y, _epoch(cfg))
    hook.remove()
    assert seen and seen[0] == torch.bfloat16
    assert abs(low["reg"] - ref["reg"]) <= 5e-3 + 0.02 * abs(ref["reg"]), (low, ref)
    assert abs(low["gen"] - ref["gen"]) <= 1e-5 + 1e-5 * abs(ref["gen"])  # the student is fp32 on both sides
    assert cosine(g_low, g_ref) >= 0.995
    for m in (ref_m, low_m):
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-2)
        m.after_step()
    for (name, t_ref), t_low in zip(ref_m.teacher.named_parameters(), low_m.teacher.parameters(), strict=True):
        assert t_low.dtype == torch.float32, name
        assert torch.allclose(t_low, t_ref, atol=1e-6), name


# ---------------------------------------------------------------------------------------- CRF on CUDA


def _image(h, w, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return np.clip(gaussian_filter(rng.random((h, w, 3)) * 255, (3, 3, 0)), 0, 255).astype(np.uint8)


def _probs(k, h, w, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    p = gaussian_filter(rng.random((k, h, w)), (0, 8, 8)).astype(np.float32) ** 4
    return p / p.sum(0, keepdims=True)


@pytest.mark.parametrize("preset", ["psa", "vit_pcm"])
def test_crf_torch_on_device_agrees_with_cpu(preset):
    """`refine(..., device='cuda')` (backend torch) at VOC size, and `refine_batch` on the device, against
    the torch backend on the CPU."""
    from wsss.config import CRFConfig
    from wsss.postprocess.crf import refine, resolve
    from wsss.postprocess.crf_torch import refine_batch

    h, w = (60, 80) if ON_CPU else (375, 500)
    k = 3
    cfg = resolve(CRFConfig(preset=preset, backend="torch"))
    images = [_image(h, w, s) for s in range(2)]
    probs = [_probs(k, h, w, s) for s in range(2)]
    on_cpu = [refine(images[i], probs[i], cfg, device="cpu") for i in range(2)]
    on_dev = refine(images[0], probs[0], cfg, device=str(DEV))
    assert on_dev.shape == (h, w) and on_dev.dtype == np.uint8
    assert (on_dev == on_cpu[0]).mean() >= 0.995
    batched = refine_batch(torch.from_numpy(np.stack(images)).to(DEV), torch.from_numpy(np.stack(probs)).to(DEV), cfg)
    assert batched.device.type == DEV.type
    for i in range(2):
        assert (batched[i].cpu().numpy() == on_cpu[i]).mean() >= 0.995


# ------------------------------------------------------------------------------------- torch.compile


class _Losses(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x, y, epoch: int):
        return self.method.forward_losses(x, y, epoch)


def test_compile_patch_classifier_matches_eager():
    """TKP-PCL (top-K, PCE, HV-BiLSTM) with a small ViT (compile time stays in seconds): compiled
    forward_losses and class_maps equal eager ones; the full recipe (ET on) compiled trains 2 steps."""
    backend = "eager" if ON_CPU else "inductor"
    small = ["model.backbone.name=test_vit", "model.backbone.img_size=64"]
    method, cfg = build("voc/tkp_pcl_vit_b16", [*small, "method.et.weight=0"])
    state = copy.deepcopy(method.state_dict())
    x, y = batch(method, 64)
    ref, g_ref = step_grads(method, x, y, _epoch(cfg))
    method.load_state_dict(state)
    compiled = torch.compile(_Losses(method), backend=backend)
    got, g_got = step_grads(method, x, y, _epoch(cfg), fwd=compiled)
    assert abs(got["loss"] - ref["loss"]) <= 1e-3 * abs(ref["loss"]) + 1e-5, (got, ref)
    assert cosine(g_got, g_ref) >= 0.999
    method.eval()
    with torch.no_grad():
        maps_ref = method.class_maps(x)
        maps_got = torch.compile(method.class_maps, backend=backend)(x)
    assert torch.allclose(maps_got, maps_ref, rtol=1e-3, atol=1e-3 * float(maps_ref.abs().max()) + 1e-6)

    full, cfg = build("voc/tkp_pcl_vit_b16", small)  # ET on: its random crops change shapes (recompiles)
    opt = torch.optim.Adam([p for p in full.parameters() if p.requires_grad], lr=1e-4)
    run = torch.compile(_Losses(full), backend=backend)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = run(x, y, _epoch(cfg))["loss"]
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
