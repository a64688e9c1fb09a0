"""File IO every stage shares: atomic writes, images, VOC palette masks, checkpoints.

Every output goes through `atomic_path`: written to a temp file in the same folder, then renamed, so a
kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss.errors import DataError  # re-exported: callers import it from here

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")




@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------ images


def claim_settings(path: str | Path, settings: dict, what: str = "masks") -> None:
    """Write `settings` to PATH (a folder's settings file), or refuse with a ConfigError when PATH holds
    others: resuming into a folder is only safe with the settings that made what it holds, so outputs of
    two configurations never mix in one folder."""
    from wsss.errors import ConfigError

    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ConfigError(f"{path.parent}: holds {what} made with other settings ({', '.join(diff)} differ; "
                              f"see {path.name}); choose another --out or delete the folder")
    else:
        atomic_write_json(path, settings)


def read_image(path: str | Path) -> Image.Image:
    """An RGB image; EXIF orientation applied; grayscale, CMYK, RGBA, palette and 16-bit converted."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).round().astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


# ------------------------------------------------------------------------------------------------- masks


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 entries, bit-interleaved), as VOC and labelme write it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3 : 256 * 3] = [224, 224, 192]  # VOC's colour for the 255 "ignore" band
    return palette


def read_mask(path: str | Path) -> np.ndarray:
    """A class-id mask (uint8, 255 = ignore) from a palette or grayscale PNG."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated mask ({e})") from None
    if mode in ("P", "L"):
        return arr.astype(np.uint8, copy=False)
    if mode in ("I;16", "I;16B", "I;16L", "I") and arr.max(initial=0) <= 255:
        return arr.astype(np.uint8)
    raise DataError(
        f"{path}: mask must be a palette or grayscale PNG of class ids, got mode {mode}"
        " (an RGB colour mask needs converting to class ids first)"
    )


def encode_mask_png(mask: np.ndarray) -> bytes:
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    im = Image.fromarray(mask.astype(np.uint8, copy=False), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    # Fixed settings so the same mask always gives the same bytes (resumable runs compare byte-exact).
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a class-id mask as a VOC palette PNG, atomically."""
    atomic_write_bytes(path, encode_mask_png(mask))


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """Load a checkpoint or weights file with weights_only=True: a hostile pickle cannot run code."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the reason (e.g. "unsupported GLOBAL posix.system") in advice to retry with
        # weights_only=False, which is no option here: show the reason alone.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), type(e).__name__)
        raise DataError(f"{path}: refused to load: not a plain tensor checkpoint ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as e:  # corrupt files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot load checkpoint ({detail})") from None

