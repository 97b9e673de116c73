"""Cache keys, each derived from what builds the thing it keys.

A backdoored model's key hashes its source model and the attack record :func:`plan_attack`
makes (what :func:`~clipguard.attacks.poison.run_attack` stores), so a directory made by
``clipguard attack`` with the same settings counts too. A defense cell's key hashes the model's
key, the method's config and the ``key()`` of each data spec the cell reads
(:class:`~clipguard.data.pool.DefenderData`). A setting added after results were cached is left
out while it holds the value of the old behaviour (``added_setting`` metadata on its field),
so adding an option keeps old caches valid.

    key = cell_key(model_key, "rvpt", RVPTConfig(seed=0), limit=None, data=DefenderData())
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, get_trigger_class
from clipguard.attacks.poison import ATTACK_IDENTITY, plan_attack
from clipguard.config import settings_added_later
from clipguard.data.pool import DefenderData
from clipguard.defenses import get_defense_class

NO_DEFENSE = "none"  # the suspect as it is


def config_hash(settings: dict) -> str:
    """A short stable hash of a JSON-able settings dict (the cache key)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def without_device(settings: dict) -> dict:
    """Settings minus where they run: the device does not change what is computed."""
    return {k: (without_device(v) if isinstance(v, dict) else v) for k, v in settings.items() if k != "device"}


def without_added(settings: dict, config_class: type | None) -> dict:
    """``settings`` less the fields of ``config_class`` added later that hold their old-behaviour value."""
    added = settings_added_later(config_class) if config_class is not None else {}
    return {k: v for k, v in settings.items() if k not in added or v != added[k]}


def trigger_settings_key(name: str, settings: dict) -> str:
    """The key of one trigger's settings (``name``'s config as a dict)."""
    return config_hash(without_added(settings, get_trigger_class(name).config_class))


def record_key(source: str, record: dict) -> str:
    """Hash of what made a backdoored model: its source model and the identity fields of its attack
    record (:data:`~clipguard.attacks.poison.ATTACK_IDENTITY`; not its classes, counts or timings)."""
    kept = {k: record.get(k) for k in ATTACK_IDENTITY}
    if record.get("captions"):  # a user's corpus (the built-in one is left out: old keys stay valid)
        kept["captions"] = record["captions"]
    if isinstance(kept["trigger"], dict):
        try:
            trigger_class = get_trigger_class(record["name"]).config_class
        except (ClipguardError, KeyError):
            trigger_class = None  # a trigger this version does not know: its settings as they are
        kept["trigger"] = without_added(kept["trigger"], trigger_class)
    return config_hash({"model": source, **without_device(kept)})


def attack_key(source: str, image_size: int, attack: AttackConfig, trigger_overrides: dict | None = None,
               data: DefenderData | None = None) -> str:
    """The key of the model ``attack`` makes from a clean model (``source``, ``image_size`` px) on
    ``data``'s captions (classes of its dataset for a caption corpus): :func:`record_key` of the
    record :func:`plan_attack` gives, the one the attack stores."""
    data = data or DefenderData()
    _, record = plan_attack(attack, trigger_overrides, data.captions, data.dataset, image_size)
    return record_key(source, record)


def cell_key(model_key: str, method: str, settings, limit: int | None, data: DefenderData | None = None) -> str:
    """The key of one evaluated (model, defense) cell: the model's key, the method and its config
    (a dataclass, or a dict; {} for no defense), the evaluation limit, and ``data``'s keys for what
    the method learns from (:meth:`DefenderData.key`)."""
    config_class = type(settings) if is_dataclass(settings) else None
    if config_class is None and method != NO_DEFENSE:
        config_class = get_defense_class(method).config_class
    settings = without_added(asdict(settings) if is_dataclass(settings) else settings, config_class)
    kind = get_defense_class(method).data if method != NO_DEFENSE else None
    return config_hash({"model": model_key, "method": method, "settings": without_device(settings), "limit": limit,
                        **(data or DefenderData()).key(kind)})
