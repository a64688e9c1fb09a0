"""Paper-scale smoke test: every voc/ and coco/ preset trains 2 steps from random weights and pseudo-labels
one VOC-size image (500 x 375), through the public API (`wsss.engine.train`, `wsss.engine.pseudo_label`).

Data: a synthetic VOC-layout folder (tests/conftest.py `make_voc_dataset`): 4 training images and 1 val
image, all 500 x 375. An AffinityNet preset (voc/psa_resnet38) has no class maps: its seeds come from a
2-step demo/cam_cnn run (`pseudo_label --save-maps`), and `refine` (what `wsss refine` runs) trains it 2
steps on the val image's confident labels and walks the seeds. The coco/ presets read it too (`data.format=voc`): what is smoked is the recipe
(backbone, method, optimiser, inference settings), not the COCO reader (tests/test_data.py has that).

Size. On CPU (`make test` runs everything, 2 threads): EVERY preset runs at a reduced size, since one
step at the preset's own size takes well over 30 s there (ViT-B/16 at 384 px with batch 64, ResNet-38d
at 448 px with batch 8, DeepLab-ResNet-101 at 512 px): batch 2, crop 64 px, inference short side 64 px
(the pseudo mask is still written at the image's 500 x 375). The preset's scales, flips, method and
optimiser settings are kept; CRF runs with the preset's CRF settings. With a GPU, `test_preset_full_size`
(marked `gpu`) runs each preset at its own crop, batch and inference size.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from conftest import make_voc_dataset
from wsss.config import PRESET_DIR, load_config
from wsss.engine import pseudo_label, train

PRESETS = sorted(
    str(p.relative_to(PRESET_DIR).with_suffix("")) for d in ("voc", "coco") for p in (PRESET_DIR / d).glob("*.yaml")
)
SIZE = (500, 375)
CRF = importlib.util.find_spec("pydensecrf") is not None


def _dataset(tmp_path_factory, n_train: int):
    ids = [f"2007_{k:06d}" for k in range(n_train + 1)]
    return make_voc_dataset(
        tmp_path_factory.mktemp("paper"), ids=ids, size=SIZE, splits={"train": ids[:n_train], "val": ids[n_train:]}
    )


@pytest.fixture(scope="module")
def voc500(tmp_path_factory):
    return _dataset(tmp_path_factory, 4)


def _run(preset: str, root, tmp_path, extra: list[str], device: str) -> None:
    overrides = [
        f"data.root={root}",
        "data.format=voc",
        "data.train_split=train",
        "data.val_split=val",
        "data.num_workers=0",
        "model.backbone.pretrained=false",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.val_every=0",
        *extra,
    ]
    cfg = load_config(preset, overrides)
    run, out = tmp_path / "run", tmp_path / "pseudo"
    if cfg.method.name == "affinity":  # PSA: no class maps; `wsss refine` walks seeds of a CAM run
        from wsss.engine.refine import refine

        seeds_run, seeds = tmp_path / "seeds_run", tmp_path / "seeds"
        train(load_config("demo/cam_cnn", [*overrides, "data.crop_size=64", "train.batch_size=2"]), seeds_run, progress=False)
        pseudo_label(seeds_run, root, "val", seeds, save_maps=True, device=device, progress=False)
        refine(cfg, run, seeds, root, "val", out, device=device, progress=False)
    else:
        train(cfg, run, progress=False)
        pseudo_label(run, root, "val", out, crf=CRF, device=device, progress=False)
    assert (run / "last.pt").is_file()
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == SIZE


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke_reduced(preset, voc500, tmp_path):
    _run(preset, voc500, tmp_path, ["data.crop_size=64", "train.batch_size=2", "infer.size=64"], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_full_size(preset, tmp_path_factory, tmp_path):
    cfg = load_config(preset)
    root = _dataset(tmp_path_factory, max(4, cfg.train.batch_size))  # one full batch
    _run(preset, root, tmp_path, [], "cuda")
