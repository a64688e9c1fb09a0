"""The paper-scale presets (configs/voc, configs/coco) are the reference code's recipes (docs/recipes.md):
each preset's resolved config is pinned by a stored copy in tests/fingerprints/, so a change to a preset,
or to a default it inherits, is a deliberate, reviewed change. Also the bounded temperature of cam.py.

After an intended change: WSSS_UPDATE_FINGERPRINTS=1 pytest tests/test_recipes.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from wsss.config import PRESET_DIR, load_config, save_config
from wsss.methods.cam import CAMConfig, CAMMethod, RegConfig, generation_scores

FINGERPRINTS = Path(__file__).parent / "fingerprints"
UPDATE = os.environ.get("WSSS_UPDATE_FINGERPRINTS") == "1"
PAPER_PRESETS = sorted(f"{p.parent.name}/{p.stem}" for fam in ("voc", "coco") for p in (PRESET_DIR / fam).glob("*.yaml"))
# presets added after the recipe audit of docs/recipes.md (their headers cite their source): fingerprinted,
# not yet in the doc. Empty: voc/psa_resnet38 has its section now.
NOT_AUDITED: dict[str, str] = {}
HOW_TO_UPDATE = "WSSS_UPDATE_FINGERPRINTS=1 pytest tests/test_recipes.py"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _resolved(preset: str, tmp_path: Path) -> str:
    path = tmp_path / "config.yaml"
    save_config(load_config(preset), path)  # what `wsss train` writes into its run folder
    return path.read_text(encoding="utf-8")


def test_there_are_paper_presets():
    assert {"voc/vit_pcm_vit_b16", "voc/tkp_pcl_vit_b16", "voc/usage_deit_s", "voc/usage_resnet38d",
            "coco/tkp_pcl_vit_b16", "coco/usage_deit_s"} <= set(PAPER_PRESETS)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_resolved_config_matches_its_fingerprint(preset, tmp_path):
    text = _resolved(preset, tmp_path)
    stored = FINGERPRINTS / f"{preset.replace('/', '_')}.yaml"
    if UPDATE:
        FINGERPRINTS.mkdir(exist_ok=True)
        stored.write_text(f"# resolved `{preset}`; regenerate with: {HOW_TO_UPDATE}\n{text}", encoding="utf-8")
        return
    assert stored.is_file(), f"{stored} missing: create it with `{HOW_TO_UPDATE}`"
    want, got = _flat(yaml.safe_load(stored.read_text(encoding="utf-8"))), _flat(yaml.safe_load(text))
    diff = [f"  {k}: stored {want.get(k, '<absent>')!r}, now {got.get(k, '<absent>')!r}"
            for k in sorted(set(want) | set(got)) if want.get(k, "<absent>") != got.get(k, "<absent>")]
    assert not diff, (
        f"{preset}: the resolved config differs from {stored.name}:\n" + "\n".join(diff)
        + f"\nIf the change is intended (and docs/recipes.md says so), update with: {HOW_TO_UPDATE}"
    )


@pytest.mark.parametrize("path", sorted([*(PRESET_DIR / "voc").glob("*.yaml"), *(PRESET_DIR / "coco").glob("*.yaml"),
                                         PRESET_DIR / "_base_" / "voc.yaml", PRESET_DIR / "_base_" / "coco.yaml"]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_comments_point_to_the_recipes_doc(path):
    if f"{path.parent.name}/{path.stem}" in NOT_AUDITED:
        pytest.skip(NOT_AUDITED[f"{path.parent.name}/{path.stem}"])
    comments = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if "#" in line)
    assert "docs/recipes.md" in comments, f"{path}: its comments must point to docs/recipes.md"


def test_recipes_doc_names_every_paper_preset():
    doc = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    for preset in sorted(set(PAPER_PRESETS) - set(NOT_AUDITED)):
        assert f"{preset}.yaml" in doc, f"docs/recipes.md does not mention {preset}.yaml"


# ------------------------------------------------------------------------- temperature forms (cam.py)


def _peak_map(n: int = 16, peak: float = 100.0) -> torch.Tensor:
    a = torch.zeros(1, 1, n)
    a[..., 0] = peak
    return a.requires_grad_(True)


def test_plain_negative_tau_lowers_the_peak():
    # ds/dA_i = alpha_i (1 + (A_i - s) / tau) < 0 where A_i > s + |tau|: raising s lowers the object's peak
    a = _peak_map()
    generation_scores(a, -1.0, "plain").sum().backward()
    assert a.grad[0, 0, 0] < 0 < a.grad[0, 0, 1]


def test_scaled_negative_tau_keeps_the_peak_gradient_positive():
    a = _peak_map()
    generation_scores(a, -4.0, "scaled").sum().backward()
    assert (a.grad > 0).all()  # |tau| = 4 sd: no position of 16 lies 4 sd above the score (sqrt(15) < 4)


@pytest.mark.parametrize("tau", [-4.0, -1.0, 0.5, 4.0])
def test_scaled_form_is_scale_invariant(tau):
    torch.manual_seed(0)
    a = torch.randn(2, 3, 7, 5)
    s = generation_scores(a, tau, "scaled")
    for c in (0.01, 3.0, 250.0):
        assert torch.allclose(generation_scores(c * a, tau, "scaled"), c * s, rtol=1e-4, atol=1e-6)
    # the plain form is not: its weights depend on the maps' scale
    assert not torch.allclose(generation_scores(100.0 * a, tau, "plain"), 100.0 * generation_scores(a, tau, "plain"))


def test_scaled_form_limits_and_default():
    a = torch.randn(2, 3, 20)
    assert torch.allclose(generation_scores(a, math.inf, "scaled"), a.mean(-1))
    assert torch.allclose(generation_scores(a, 1e-4, "scaled"), a.amax(-1), atol=1e-3)
    assert torch.allclose(generation_scores(a, -1e-4, "scaled"), a.amin(-1), atol=1e-3)
    assert CAMConfig().tau_mode == "plain"  # existing configs keep the literal form
    with pytest.raises(ValueError):
        generation_scores(a, 1.0, "bogus")


class _Grid(torch.nn.Module):
    out_channels, stride, kind = 4, 1, "cnn"

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)

    def blocks(self):
        return [self.conv]


def test_reg_tau_never_inherits_a_negative_generation_tau():
    def reg_tau(gen_tau, **reg):
        return CAMMethod(CAMConfig(tau=gen_tau, reg=RegConfig(weight=1.0, **reg)), None, 3, backbone=_Grid())._reg_tau()

    assert reg_tau(-4.0) == 1.0
    assert reg_tau(math.inf) == 1.0
    assert reg_tau(4.0) == 4.0  # the demo's usage_vit keeps its behaviour
    assert reg_tau(-4.0, tau=2.0) == 2.0


def test_method_uses_the_configured_form():
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 6, 6), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = {}
    for mode in ("plain", "scaled"):
        torch.manual_seed(1)
        m = CAMMethod(CAMConfig(tau=-1.0, tau_mode=mode), None, 3, backbone=_Grid()).train()
        losses[mode] = m.forward_losses(images, labels, 0)["loss"].item()
        assert m.image_scores(images).shape == (2, 2)
    assert losses["plain"] != pytest.approx(losses["scaled"])
    with pytest.raises(Exception, match="tau_mode"):
        CAMMethod(CAMConfig(tau=1.0, tau_mode="raw"), None, 3, backbone=_Grid())
