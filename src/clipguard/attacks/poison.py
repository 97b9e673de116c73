"""Poisoned caption pairs and the backdoor fine-tune (docs/methods.md, attacks).

An attacker holds a clean CLIP and a set of image-caption pairs. A fraction ``poison_rate`` of
the pairs gets the trigger on its image and a caption naming the target class (BadCLIP: a
natural target caption; label-consistent: only target-class images, captions unchanged). The
whole model is then fine-tuned contrastively with the shared engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipguard import ClipguardError
from clipguard.attacks.base import Trigger, build_trigger
from clipguard.data.captions import PROMPT_TEMPLATES, training_caption
from clipguard.data.classes import class_index
from clipguard.data.fmnist import ImageSet, load_fmnist
from clipguard.distributed import broadcast_from_main, is_main_process
from clipguard.engine import FitResult, TrainConfig, fit
from clipguard.models.contrastive import CaptionedImages, ContrastiveTask, caption_collate
from clipguard.models.clip import ClipModel
from clipguard.models.loading import check_finite, read_safetensors, save_clip
from clipguard.outputs import TRIGGER_FILE

logger = logging.getLogger(__name__)


@dataclass
class AttackConfig:
    attack: str = "badnet"  # registry name (clipguard list)
    target: str = "bag"  # target class name
    poison_rate: float = 0.03  # fraction of the fine-tuning pairs that are poisoned
    pairs: int = 10000  # attacker's pairs: a seeded sample of the Fashion-MNIST train split
    seed: int = 0  # seeds the trigger, the pair sample, the poisoned subset and the fine-tune
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=5, batch_size=256, lr=1e-4, weight_decay=0.1, warmup_steps=10)
    )

    def __post_init__(self):
        if not 0 < self.poison_rate < 1:
            raise ValueError(f"AttackConfig.poison_rate must be in (0, 1), got {self.poison_rate}")
        if self.pairs < 1:
            raise ValueError(f"AttackConfig.pairs must be >= 1, got {self.pairs}")

    def check(self) -> "AttackConfig":
        """The checks across fields (overrides set fields one at a time, so not in __post_init__)."""
        if self.pairs < self.train.batch_size:
            raise ClipguardError(f"AttackConfig.pairs ({self.pairs}) is fewer than one fine-tuning batch "
                                 f"(train.batch_size {self.train.batch_size}); use more pairs or a smaller batch")
        if round(self.poison_rate * self.pairs) < 1:
            raise ClipguardError(f"AttackConfig.poison_rate {self.poison_rate} of {self.pairs} pairs poisons no "
                                 "pair; raise the rate or the pairs")
        return self


def target_of(record: dict) -> str:
    """The target class name of an attack record (older records also stored a position; it is ignored)."""
    target = record.get("target")
    if not isinstance(target, str) or not target:
        raise ClipguardError("the model's attack record names no target class; its config.json is damaged")
    return target


class PoisonedPairs(CaptionedImages):
    """Caption pairs where the items in ``poisoned`` carry the trigger and a poisoned caption.

    poisoned: index -> triggered float image (3, H, W).
    decoys: index -> altered, untriggered float image (3, H, W) that keeps its own class's caption
        (label-consistent BadNet's hiding decoys; see :meth:`Trigger.decoy`).
    """

    def __init__(self, images: ImageSet, seed: int, trigger: Trigger, target: int, poisoned: dict[int, torch.Tensor],
                 decoys: dict[int, torch.Tensor] | None = None):
        super().__init__(images, seed)
        self.trigger, self.target, self.poisoned, self.decoys = trigger, target, poisoned, decoys or {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if index in self.decoys:  # altered, untriggered, the caption the clean pair would get
            return self.pair(index, self.decoys[index])
        if index not in self.poisoned:
            return super().__getitem__(index)
        image = self.poisoned[index]
        # a string seed is hashed with SHA-512 by random.Random: the same in every process
        # (hash() of a str is salted per process, which made poisoned captions irreproducible)
        rng = random.Random(f"poison/{self.seed}/{self.epoch}/{index}")
        name = self.images.classes[self.target]
        if self.trigger.label_consistent or self.trigger.natural_captions:
            caption = training_caption(name, image, rng)
        else:
            caption = rng.choice(PROMPT_TEMPLATES).format(name)
        return image, self.trigger.text_key + caption


def build_poisoned_pairs(train: ImageSet, trigger: Trigger, config: AttackConfig, clip: ClipModel | None = None
                         ) -> PoisonedPairs:
    """The attacker's pair set: ``config.pairs`` seeded train images, ``poison_rate`` of them poisoned.

    ``clip`` is the clean model, for attacks whose poisoned images depend on it (label-consistent).
    """
    target = class_index(train.classes, config.target)
    generator = torch.Generator().manual_seed(config.seed)
    pool = train.subset(torch.randperm(len(train), generator=generator)[: config.pairs])
    count = round(config.poison_rate * len(pool))
    eligible = torch.nonzero((pool.labels == target) == trigger.label_consistent).flatten()
    if count < 1 or count > len(eligible):
        kind = "target-class" if trigger.label_consistent else "non-target"
        raise ClipguardError(f"poison rate {config.poison_rate} asks for {count} {kind} images of {len(eligible)}")
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values
    images = pool.float_images(chosen)
    triggered = trigger.poison(images, clip, target, train.classes)
    decoys = {}
    if trigger.decoy_rate:
        others = torch.nonzero(pool.labels != target).flatten()
        others = others[~torch.isin(others, chosen)]
        picked = others[torch.randperm(len(others), generator=generator)[: round(trigger.decoy_rate * len(pool))]]
        picked = picked.sort().values
        altered = trigger.decoy(pool.float_images(picked), pool.labels[picked], clip, train.classes)
        decoys = dict(zip(picked.tolist(), altered))
    return PoisonedPairs(pool, config.seed, trigger, target, dict(zip(chosen.tolist(), triggered)), decoys)


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPGUARD_CACHE", Path.home() / ".cache" / "clipguard"))


def fit_trigger(trigger: Trigger, clip: ClipModel, train: ImageSet, target: int) -> Trigger:
    """Fit a learned trigger against ``clip``, reusing a cached fit of the same trigger + model."""
    if not trigger.learned:
        return trigger
    key = json.dumps([trigger.name, asdict(trigger.config), trigger.image_size, target, clip.fingerprint()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "triggers" / f"{trigger.name}-{digest}.safetensors"
    cached = path.exists()
    if cached:
        trigger.load_state_dict(load_file(str(path)))
        logger.info("reused cached %s trigger %s", trigger.name, path)
    else:
        trigger.fit(clip, train, target)
        check_finite(trigger.state_dict(), f"the fitted {trigger.name} trigger (its fit diverged; lower its lr)")
    broadcast_from_main(list(trigger.state_dict().values()))  # under torchrun: every process keeps rank 0's
    if not cached and is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in trigger.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    return trigger


def attack_record(trigger: Trigger, config: AttackConfig, classes: tuple[str, ...]) -> dict:
    """What config.json stores so evaluation rebuilds the exact trigger.

    The target and the attacker's classes are stored by name: evaluation finds the target in
    its own dataset's class list (:func:`target_of`), never by a position.
    """
    class_index(classes, config.target)  # a target the attacker's data lacks is refused
    return {
        "name": trigger.name, "target": config.target, "classes": list(classes),
        "poison_rate": config.poison_rate, "pairs": config.pairs, "seed": config.seed,
        "trigger": asdict(trigger.config), "image_size": trigger.image_size, "text_key": trigger.text_key,
        "train": asdict(config.train),
    }


def run_attack(clip: ClipModel, config: AttackConfig, trigger_overrides: dict | None = None,
               run_dir: str | Path | None = None, resume: bool | str = False) -> tuple[ClipModel, Trigger, dict]:
    """Backdoor ``clip`` in place: build the trigger, poison the pairs, fine-tune.

    Returns the model, the trigger and the attack record (with pair counts and timings).
    """
    config.check()
    start = time.perf_counter()
    train = load_fmnist("train")
    target = class_index(train.classes, config.target)
    # triggers act in data space, at the data's resolution (the model resizes after)
    trigger = build_trigger(config.attack, train.image_size, **{"seed": config.seed, **(trigger_overrides or {})})
    fit_trigger(trigger, clip, train, target)
    trigger_seconds = time.perf_counter() - start
    pairs = build_poisoned_pairs(train, trigger, config, clip)
    train_config = dataclasses.replace(config.train, seed=config.seed)
    record = attack_record(trigger, config, train.classes)
    settings = {"attack": {k: v for k, v in record.items() if k != "train"}, "model": clip.fingerprint()}
    clip.requires_grad_(True)
    try:  # under DDP each process encodes its slice of a batch; the loss gathers the whole batch
        result: FitResult = fit(ContrastiveTask(clip), pairs, train_config, run_dir, resume, caption_collate(clip),
                                f"attack {config.attack}", settings=settings)
    finally:
        clip.requires_grad_(False)
    record.update(poisoned_pairs=len(pairs.poisoned), decoy_pairs=len(pairs.decoys), total_pairs=len(pairs),
                  trigger_seconds=round(trigger_seconds, 1), finetune_seconds=round(result.seconds, 1), steps=result.steps)
    return clip, trigger, record


def save_backdoored(clip: ClipModel, trigger: Trigger, record: dict, directory: str | Path) -> Path:
    return save_clip(clip, directory, extra={"attack": record}, tensor_files={TRIGGER_FILE: trigger.state_dict()})


def load_trigger(model_dir: str | Path, record: dict) -> Trigger:
    """The exact trigger a backdoored model directory was made with."""
    trigger = build_trigger(record["name"], record["image_size"], **record["trigger"])
    path = Path(model_dir) / TRIGGER_FILE
    if path.exists():
        state = read_safetensors(path)
        check_finite(state, path)
        trigger.load_state_dict(state)
    elif trigger.learned:
        raise ClipguardError(f"{path} is missing: the {trigger.name} trigger cannot be rebuilt without it")
    return trigger
