"""CAM seeds: plain CAM (global average pooling) and USAGE (temperature generation loss + EMA teacher
regularisation), for CNN and Transformer backbones.

IMPLEMENTATION PENDING (helper). The config dataclass below is the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from wsss.methods.base import Method


@dataclass
class RegConfig:
    weight: float = 0.0  # w_REG; 0 turns the teacher/student regularisation off
    student_drop: float = 0.5  # strong network adjustment (dropout / drop-path) for the student
    teacher_drop: float = 0.1  # weak adjustment for the teacher
    ema: float = 0.999  # teacher = EMA of the student
    teacher_tau: float = 1.0  # sharpening temperature of the teacher's spatial distribution


@dataclass
class CAMConfig:
    name: str = "cam"
    tau: float = math.inf  # generation temperature: inf = GAP (plain CAM), > 0 towards max, < 0 towards min
    reg: RegConfig = field(default_factory=RegConfig)


class CAMMethod(Method):
    has_background = False
