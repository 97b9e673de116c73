"""Backdoor defenses: one file per defense, registered here by explicit import."""

from clipguard.defenses import rvpt  # noqa: F401  (registration)
from clipguard.defenses import cbpt  # noqa: F401
from clipguard.defenses import linear_probe  # noqa: F401
from clipguard.defenses.base import (
    DEFENSES, Defense, DefendedClip, DefenseConfig, get_defense_class, load_defense, save_defense,
)

__all__ = ["DEFENSES", "Defense", "DefendedClip", "DefenseConfig", "get_defense_class", "load_defense", "save_defense"]
