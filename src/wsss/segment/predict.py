"""`wsss predict`: masks for new images, no tags needed, from a stage-2 run (plain argmax over all
classes) or a stage-1 run (the model's predicted tags); and `predict_dataset` for a dataset split with
evaluation.

Output names: an image given as a file -> `<out>/<stem>.png`; an image found in a given folder (searched
recursively) -> `<out>/<path relative to that folder, without suffix>.png`, so equal stems in different
sub-folders do not collide. Two inputs mapping to one output name are a DataError before any work.
Masks are VOC palette PNGs written atomically; an existing output is skipped (resumable).
A bad image is reported and skipped; after the others are done, `predict` raises a DataError naming the
bad files (`strict=False`: they are only listed in the summary's "failed").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import IMAGE_EXTENSIONS, DataError, atomic_path, read_image, voc_palette, write_mask


def collect_images(inputs: list[str | Path]) -> list[tuple[Path, Path]]:
    """(image path, output name without suffix) for files and folders (recursive), sorted per folder."""
    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [(p, p.relative_to(item).with_suffix("")) for p in files]
        elif item.is_file():
            found.append((item, Path(item.stem)))
        else:
            raise DataError(f"{item}: no such image file or folder")
    seen: dict[Path, Path] = {}
    for path, name in found:
        if name in seen and seen[name] != path:
            raise DataError(f"{path} and {seen[name]} would both be written as {name}.png; predict them separately")
        seen[name] = path
    if not seen:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return [(p, n) for n, p in seen.items()]


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with its foreground pixels blended with their VOC palette colour (background and
    ignore pixels left as they are)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.asarray(voc_palette(), dtype=np.float32).reshape(256, 3)[mask]
    fg = ((mask > 0) & (mask != 255))[..., None]
    out = np.where(fg, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(out.round().astype(np.uint8))


def write_overlay(path: Path, image: Image.Image, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        overlay_mask(image, mask).save(tmp, format="JPEG", quality=90)


def predict(
    run_dir: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    overlay: bool = False,
    crf: bool = False,
    device: str = "auto",
    strict: bool = True,
    progress: bool = True,
) -> dict:
    """Write a mask (and with `overlay`, `<name>_overlay.jpg`) for every image; see the module doc.
    `crf`: refined by a dense CRF over the background + the predicted classes (`cfg.infer.crf`, in worker
    processes). Returns {"num_images", "computed", "skipped", "failed": [{"path", "error"}], "out_dir",
    "seconds"}."""
    import torch

    from wsss.data.base import RawSample
    from wsss.engine.extent import apply_extent_guard
    from wsss.engine.inference import (
        crf_channels,
        eval_transform,
        load_run,
        resolve_device,
        run_checkpoint,
        seed_mask,
        seed_probs,
    )
    from wsss.engine.pseudo_masks import crf_pool

    t0 = time.time()
    out_dir = Path(out_dir)
    todo = collect_images(images)
    cfg, method, class_names = load_run(run_dir, device=resolve_device(device))
    # a seed method's masks at the extent its pseudo masks use (wsss.engine.extent; its train split's tags)
    apply_extent_guard(run_dir, cfg, method, run_checkpoint(run_dir), None)
    transform = eval_transform(cfg)  # the same input as pseudo-labelling: short side to infer.size
    computed, skipped, failed = 0, 0, []
    pending: dict[Path, tuple[Image.Image, list[int]]] = {}  # CRF in flight: name -> (image, kept classes)

    def finish(name: Path, image: Image.Image, mask: np.ndarray) -> None:
        nonlocal computed
        if overlay:  # before the mask: an existing mask PNG means the image is complete
            write_overlay(out_dir / f"{name}_overlay.jpg", image, mask)
        write_mask(out_dir / f"{name}.png", mask)
        computed += 1

    def work():
        """Computes every image's classes; finishes it, or yields its CRF job (name, rgb, probs)."""
        nonlocal skipped
        todo_iter = todo
        if progress:
            from tqdm.auto import tqdm

            todo_iter = tqdm(todo, desc="predict", dynamic_ncols=True, leave=False)
        for path, name in todo_iter:
            if (out_dir / f"{name}.png").is_file() and (not overlay or (out_dir / f"{name}_overlay.jpg").is_file()):
                skipped += 1
                continue
            try:
                image = read_image(path)
            except DataError as e:
                print(f"warning: skipped {e}", file=sys.stderr)
                failed.append({"path": str(path), "error": str(e)})
                continue
            with torch.inference_mode():
                x = transform(RawSample(str(name), image, [], None), len(class_names))["image"]
                keep, probs = seed_probs(method, x, None, cfg.infer, (image.height, image.width))
            if not crf:
                finish(name, image, seed_mask(keep, probs))
                continue
            keep, probs = crf_channels(method, keep, probs)
            pending[name] = (image, keep)
            yield name, np.array(image, dtype=np.uint8), probs.cpu().numpy()

    if not crf:
        for _ in work():
            pass
    else:
        with crf_pool(cfg.infer.crf) as pool:
            for name, idx in pool.map(work(), cfg.infer.crf):
                image, keep = pending.pop(name)
                finish(name, image, np.asarray(keep, dtype=np.uint8)[np.asarray(idx)])
    summary = {
        "num_images": len(todo),
        "computed": computed,
        "skipped": skipped,
        "failed": failed,
        "out_dir": str(out_dir),
        "seconds": round(time.time() - t0, 3),
    }
    if failed and strict:
        names = "; ".join(f["error"] for f in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise DataError(f"{len(failed)} of {len(todo)} images could not be read, the others were written: {names}{more}")
    return summary


def predict_dataset(
    run_dir: str | Path, data_root: str | Path, split: str, out_dir: str | Path, crf: bool = False,
    device: str = "auto", progress: bool = True,
) -> dict:
    """Predict every image of a dataset split without its tags (stage 2: plain argmax; stage 1: predicted
    tags), write `<out>/<id>.png`, and when the split has masks evaluate them: returns {"miou",
    "per_class", "pixel_accuracy", ...} and writes out_dir/summary.json (the `wsss evaluate` shape).
    Resumable. It is `pseudo_label` with predicted tags (and the CRF over the predicted classes), which is
    exactly this."""
    from wsss.engine.pseudo_masks import pseudo_label

    result = pseudo_label(run_dir, data_root, split, out_dir, crf=crf, predicted_tags=True, device=device,
                          progress=progress)
    result.setdefault("miou", None)
    return result
