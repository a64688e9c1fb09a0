"""Training and inference: `train(cfg, out_dir)` writes a run folder; `pseudo_label(run, root, split, out)`
turns it into pseudo masks. Submodules are imported on use (they pull in torch)."""

from __future__ import annotations

__all__ = ["class_probabilities", "load_run", "pseudo_label", "resolve_device", "train"]


def __getattr__(name: str):
    if name == "train":
        from wsss.engine.trainer import train

        return train
    if name == "pseudo_label":
        from wsss.engine.pseudo_masks import pseudo_label

        return pseudo_label
    if name in ("class_probabilities", "load_run", "resolve_device"):
        from wsss.engine import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'wsss.engine' has no attribute {name!r}")
