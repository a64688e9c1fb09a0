"""Backbones behind one interface: a grid of feature vectors. See wsss.models.backbones."""

from wsss.models.backbones import BACKBONES, Backbone, create_backbone

__all__ = ["BACKBONES", "Backbone", "create_backbone"]
