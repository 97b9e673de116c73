"""Backdoor defenses: one file or folder per defense, registered here by explicit import."""

from clipguard.defenses import cbpt  # noqa: F401  (registration)
from clipguard.defenses import cleanclip  # noqa: F401
from clipguard.defenses import linear_probe  # noqa: F401
from clipguard.defenses import oracle_repair  # noqa: F401
from clipguard.defenses import par  # noqa: F401
from clipguard.defenses import rvpt  # noqa: F401
from clipguard.defenses.base import (
    DEFENSES, Defense, DefendedClip, DefenseConfig, Pool, get_defense_class, load_defense, save_defense,
)

__all__ = ["DEFENSES", "Defense", "DefendedClip", "DefenseConfig", "Pool", "get_defense_class", "load_defense",
           "save_defense"]
