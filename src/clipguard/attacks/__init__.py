"""Backdoor attacks on CLIP: one file per trigger, registered here by explicit import."""

from clipguard.attacks import badclip, badnet, blended, issba, sig, trojvqa, wanet  # noqa: F401  (registration)
from clipguard.attacks.base import ATTACKS, Trigger, TriggerConfig, build_trigger, get_trigger_class
from clipguard.attacks.poison import AttackConfig, build_poisoned_pairs, load_trigger, run_attack, save_backdoored

__all__ = [
    "ATTACKS", "AttackConfig", "Trigger", "TriggerConfig", "build_poisoned_pairs", "build_trigger",
    "get_trigger_class", "load_trigger", "run_attack", "save_backdoored",
]
