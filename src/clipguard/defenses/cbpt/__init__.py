"""CBPT (and CoOp): text prompts learned from clean shots, with a trigger inverted from them.

cbpt.py holds the prompts, the losses and the two registered defenses; the trigger inversion
that CBPT's L_trig and ``clipguard detect`` share is :mod:`clipguard.detection.inversion`.
"""

from clipguard.defenses.cbpt.cbpt import (
    CBPT, CBPTConfig, ClassPrompts, CoOp, CoOpConfig, keep_loss, shifted_triggers, zero_shot_cross_entropy,
)

__all__ = ["CBPT", "CBPTConfig", "ClassPrompts", "CoOp", "CoOpConfig", "keep_loss", "shifted_triggers",
           "zero_shot_cross_entropy"]
