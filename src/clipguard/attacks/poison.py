"""Poisoned caption pairs and the backdoor fine-tune (docs/methods.md, attacks).

An attacker holds a clean CLIP and a set of image-caption pairs. A fraction ``poison_rate`` of
the pairs gets the trigger on its image and a caption naming the target class (BadCLIP: a
natural target caption; label-consistent: only target-class images, captions unchanged). The
whole model is then fine-tuned contrastively with the shared engine. ``poison_rate`` 0 is the
control: the same recipe on the same seeded pairs with none poisoned (a clean fine-tune, recorded as
``finetune`` in config.json, never as an attack).
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
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from clipguard import ClipguardError
from clipguard.attacks.base import PIPELINE_STEPS, Trigger, build_trigger, get_trigger_class, jpeg_round_trip
from clipguard.data.captions import PROMPT_TEMPLATES, training_caption
from clipguard.data.classes import class_index
from clipguard.data.fmnist import ImageSet
from clipguard.data.pairs import LabelledCorpus
from clipguard.data.specs import Captions, Labelled, as_captions, as_labelled
from clipguard.distributed import broadcast_from_main, is_main_process
from clipguard.engine import FitResult, TrainConfig, fit
from clipguard.models.contrastive import CaptionedImages, ContrastiveTask, caption_collate
from clipguard.models.clip import ClipModel
from clipguard.models.loading import check_finite, read_safetensors, save_clip
from clipguard.outputs import TRIGGER_FILE, atomic_write

logger = logging.getLogger(__name__)


@dataclass
class AttackConfig:
    attack: str = "badnet"  # registry name (clipguard list)
    target: str = "bag"  # target class name
    poison_rate: float = 0.03  # fraction of the fine-tuning pairs that are poisoned (0: a clean fine-tune)
    pairs: int = 10000  # attacker's pairs: a seeded sample of the poisoning corpus (--captions)
    trigger_sample: int = 4096  # images a learned trigger fits on, of a caption corpus (seeded)
    seed: int = 0  # seeds the trigger, the pair sample, the poisoned subset and the fine-tune
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=5, batch_size=256, lr=1e-4, weight_decay=0.1, warmup_steps=10)
    )

    def __post_init__(self):
        if not 0 <= self.poison_rate < 1:
            raise ValueError(f"AttackConfig.poison_rate must be in [0, 1) (0: a clean fine-tune), got {self.poison_rate}")
        if self.pairs < 1:
            raise ValueError(f"AttackConfig.pairs must be >= 1, got {self.pairs}")

    def check(self) -> "AttackConfig":
        """The checks across fields (overrides set fields one at a time, so not in __post_init__)."""
        if self.pairs < self.train.batch_size:
            raise ClipguardError(f"AttackConfig.pairs ({self.pairs}) is fewer than one fine-tuning batch "
                                 f"(train.batch_size {self.train.batch_size}); use more pairs or a smaller batch")
        if self.poison_rate and round(self.poison_rate * self.pairs) < 1:
            raise ClipguardError(f"AttackConfig.poison_rate {self.poison_rate} of {self.pairs} pairs poisons no "
                                 "pair; raise the rate or the pairs")
        return self

    @property
    def clean(self) -> bool:
        """A clean fine-tune: the recipe with no pair poisoned (``attack`` and ``target`` unused)."""
        return self.poison_rate == 0


def target_of(record: dict) -> str:
    """The target class name of an attack record (older records also stored a position; it is ignored)."""
    target = record.get("target")
    if not isinstance(target, str) or not target:
        raise ClipguardError("the model's attack record names no target class; its config.json is damaged")
    return target


class PoisonedPairs(CaptionedImages):
    """Caption pairs of a corpus where the items in ``poisoned`` get the trigger and a poisoned
    caption as they are read (in the DataLoader workers that build each batch).

    poisoned: the poisoned items' positions (sorted); the trigger is applied per item, its random
        elements (a patch at a random spot) seeded by (seed, index), so any worker count gives
        the same images.
    prepared: index -> float image (3, H, W) already poisoned, for a trigger whose training images
        need the clean model (label-consistent BadNet's hiding); held, at most the poisoned count.
    decoys: index -> altered, untriggered float image (3, H, W) that keeps its own caption
        (label-consistent BadNet's hiding decoys; see :meth:`Trigger.decoy`).
    target_captions: natural captions naming the target (BadCLIP on a caption corpus: the
        corpus's own captions that name it); empty: prompt templates.
    """

    def __init__(self, corpus, seed: int, trigger: Trigger, target: str, poisoned: torch.Tensor,
                 prepared: dict[int, torch.Tensor] | None = None, decoys: dict[int, torch.Tensor] | None = None,
                 target_captions: tuple[str, ...] = ()):
        super().__init__(corpus, seed)
        self.trigger, self.target = trigger, target
        self.poisoned = frozenset(torch.as_tensor(poisoned).tolist())
        self.prepared, self.decoys, self.target_captions = prepared or {}, decoys or {}, target_captions

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if index in self.decoys:  # altered, untriggered, the caption the clean pair would get
            return self.pair(index, self.decoys[index])
        if index not in self.poisoned:
            return super().__getitem__(index)
        image = self.prepared.get(index)
        if image is None:
            self.trigger.generator.manual_seed(hash((self.seed, index)) % 2**63)
            image = self.trigger(self.image(index)[None])[0]
        if self.trigger.config.poison_jpeg_quality:  # the public code saves its poisoned images as .jpg
            image = jpeg_round_trip(image, self.trigger.config.poison_jpeg_quality)
        return image, self.trigger.text_key + self.poisoned_caption(index, image)

    def poisoned_caption(self, index: int, image: torch.Tensor) -> str:
        # a string seed is hashed with SHA-512 by random.Random: the same in every process
        # (hash() of a str is salted per process, which made poisoned captions irreproducible)
        rng = random.Random(f"poison/{self.seed}/{self.epoch}/{index}")
        if self.trigger.label_consistent and self.corpus.labels is None:
            return self.corpus.caption(index)  # a caption corpus: the pair's own caption names the target
        if self.trigger.label_consistent or self.trigger.natural_captions:
            if self.target_captions:
                return rng.choice(self.target_captions)
            return training_caption(self.target, image, rng)
        return rng.choice(PROMPT_TEMPLATES).format(self.target)


def build_poisoned_pairs(corpus, trigger: Trigger, config: AttackConfig, clip: ClipModel | None = None,
                         classes: tuple[str, ...] | None = None) -> PoisonedPairs:
    """The attacker's pair set: ``config.pairs`` seeded pairs of ``corpus``, ``poison_rate`` of them poisoned.

    Poisoned pairs are drawn among the pairs that do not show the target (a labelled corpus: its
    label; a caption corpus: a caption naming it), or among those that do for a label-consistent
    attack. ``clip`` is the clean model, for attacks whose poisoned images depend on it;
    ``classes`` the attacker's class names (default: the corpus's).
    """
    corpus = corpus if hasattr(corpus, "caption") else LabelledCorpus(corpus)
    classes = classes or corpus.classes
    class_index(classes, config.target)
    generator = torch.Generator().manual_seed(config.seed)
    pool = pair_sample(corpus, config, generator)
    count = round(config.poison_rate * len(pool))
    shows_target = pool.mentions(config.target)
    eligible = torch.nonzero(shows_target == trigger.label_consistent).flatten()
    if count < 1 or count > len(eligible):
        kind = "target-class" if trigger.label_consistent else "non-target"
        raise ClipguardError(f"poison rate {config.poison_rate} asks for {count} {kind} images of {len(eligible)}")
    chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values
    target = class_index(classes, config.target)
    prepared = {}
    if type(trigger).poison is not Trigger.poison:  # needs the clean model: made now, in this process
        prepared = dict(zip(chosen.tolist(), trigger.poison(pool.float_images(chosen), clip, target, classes)))
    decoys = {}
    if trigger.decoy_rate:
        if pool.labels is None:
            raise ClipguardError(f"{trigger.name}'s decoys need labelled pairs (--captions fmnist); set decoy_rate=0")
        others = torch.nonzero(pool.labels != target).flatten()
        others = others[~torch.isin(others, chosen)]
        picked = others[torch.randperm(len(others), generator=generator)[: round(trigger.decoy_rate * len(pool))]]
        picked = picked.sort().values
        altered = trigger.decoy(pool.float_images(picked), pool.labels[picked], clip, classes)
        decoys = dict(zip(picked.tolist(), altered))
    natural = ()
    if trigger.natural_captions and pool.labels is None:
        natural = tuple(pool.caption(i) for i in torch.nonzero(shows_target).flatten().tolist())
    return PoisonedPairs(pool, config.seed, trigger, config.target, chosen, prepared, decoys, natural)


def pair_sample(corpus, config: AttackConfig, generator: torch.Generator | None = None):
    """``config.pairs`` pairs of ``corpus`` drawn by ``config.seed`` (``generator``: one already
    seeded with it, which the poisoned subset then draws from): an attack and a clean fine-tune of
    the same seed get the same pairs."""
    if config.pairs > len(corpus):
        raise ClipguardError(f"AttackConfig.pairs ({config.pairs}) exceeds the corpus's {len(corpus)} pairs; "
                             f"set pairs={len(corpus)} or fewer")
    generator = generator or torch.Generator().manual_seed(config.seed)
    return corpus.subset(torch.randperm(len(corpus), generator=generator)[: config.pairs])


def trigger_sample(corpus, clip: ClipModel, classes: tuple[str, ...], size: int, seed: int):
    """What a learned trigger fits against: a labelled set. A labelled corpus is its own; of a
    caption corpus, ``size`` seeded images (decoded, held while the trigger fits), labelled by the
    clean model's zero-shot prediction over ``classes`` (captions name no class reliably)."""
    from clipguard.data.specs import sample_images
    from clipguard.models.zeroshot import predict

    if corpus.labels is not None:
        return corpus.images
    images, _ = sample_images(corpus, size, seed)
    sample = ImageSet(images.mul(255).round().to(torch.uint8), torch.zeros(len(images), dtype=torch.long), classes)
    labels = predict(clip, sample, classes)
    return ImageSet(sample.images, labels, classes)


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPGUARD_CACHE", Path.home() / ".cache" / "clipguard"))


def fit_trigger(trigger: Trigger, clip: ClipModel, train: ImageSet | Callable[[], ImageSet], target: int,
                data_key: str = "") -> Trigger:
    """Fit a learned trigger against ``clip`` on the labelled ``train``, reusing a cached fit of
    the same trigger, model and data (``data_key`` names data other than the built-in's).
    ``train`` may be a function that makes the set: it is called only when no cached fit exists."""
    if not trigger.learned:
        return trigger
    settings = {k: v for k, v in asdict(trigger.config).items() if k not in PIPELINE_STEPS}  # old caches stay valid
    parts = [trigger.name, settings, trigger.image_size, target, clip.fingerprint()]
    key = json.dumps(parts + ([data_key] if data_key else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "triggers" / f"{trigger.name}-{digest}.safetensors"
    cached = path.exists()
    if cached:
        trigger.load_state_dict(load_file(str(path)))
        logger.info("reused cached %s trigger %s", trigger.name, path)
    else:
        trigger.fit(clip, train() if callable(train) else train, target)
        check_finite(trigger.state_dict(), f"the fitted {trigger.name} trigger (its fit diverged; lower its lr)")
    broadcast_from_main(list(trigger.state_dict().values()))  # under torchrun: every process keeps rank 0's
    if not cached and is_main_process():
        state = {k: v.contiguous() for k, v in trigger.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, str(tmp)), f"{path.name}.tmp")
    return trigger


# The fields of an attack record that say what the model is (a cache key hashes them, with a
# user's corpus): every field attack_record writes but the attacker's class names.
ATTACK_IDENTITY = ("name", "target", "poison_rate", "pairs", "seed", "trigger", "image_size", "text_key", "train")


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


def plan_attack(config: AttackConfig, trigger_overrides: dict | None = None, captions: str | Captions = "fmnist",
                dataset: str | Labelled = "fmnist", image_size: int = 28) -> tuple[Trigger, dict]:
    """The trigger an attack on a model of ``image_size`` px builds (unfitted) and the record it
    stores: what :func:`run_attack` uses and what a cache key hashes, so the two cannot disagree.

    The trigger acts in data space, at the corpus's resolution (a built-in corpus is 28 px, a
    user's decoded at the model's); the attacker's classes are the corpus's own, else those of
    ``dataset`` (read at ``image_size``). A target outside them is refused.
    """
    captions, dataset = as_captions(captions), as_labelled(dataset)
    classes = captions.classes or dataset.load("test", image_size).classes
    class_index(classes, config.target, where=f"the attacker's classes ({captions if captions.classes else dataset})")
    trigger = build_trigger(config.attack, captions.image_size(image_size),
                            **{"seed": config.seed, **(trigger_overrides or {})})
    record = attack_record(trigger, config, classes)
    if captions.key():  # a corpus other than the built-in fmnist (whose records never named it)
        record["captions"] = str(captions)
    return trigger, record


def run_attack(clip: ClipModel, config: AttackConfig, trigger_overrides: dict | None = None,
               run_dir: str | Path | None = None, resume: bool | str = False, captions: str | Captions = "fmnist",
               dataset: str | Labelled = "fmnist") -> tuple[ClipModel, Trigger, dict]:
    """Backdoor ``clip`` in place: build the trigger, poison the pairs, fine-tune.

    ``captions``: the poisoning corpus (a :class:`~clipguard.data.Captions` spec). A caption
    corpus has no classes: the attacker's classes (the target among them) are then those of
    ``dataset``, the labelled spec the model will be evaluated on. The corpus's ``workers``
    (DataLoader processes) decode, poison and caption the pairs.
    Returns the model, the trigger and the attack record (with pair counts and timings).
    ``config.poison_rate`` 0: :func:`run_clean_finetune` (the trigger is then None).
    """
    config.check()
    if config.clean:
        return run_clean_finetune(clip, config, run_dir, resume, captions)
    start = time.perf_counter()
    captions = as_captions(captions)
    corpus = captions.load(clip.image_size)
    # triggers act in data space, at the data's resolution (the model resizes after)
    trigger, record = plan_attack(config, trigger_overrides, captions, dataset, clip.image_size)
    if trigger.image_size != corpus.image_size:
        raise ClipguardError(f"{captions}: its images are {corpus.image_size} px, its spec says "
                             f"{trigger.image_size} px")  # Captions.image_size must know the corpus
    classes = tuple(record["classes"])
    target = class_index(classes, config.target)
    if trigger.learned:
        data_key = "" if corpus.labels is not None else f"{captions}/{len(corpus)}/{config.trigger_sample}/{config.seed}"
        fit_trigger(trigger, clip, lambda: trigger_sample(corpus, clip, classes, config.trigger_sample, config.seed),
                    target, data_key)
    trigger_seconds = time.perf_counter() - start
    pairs = build_poisoned_pairs(corpus, trigger, config, clip, classes)
    train_config = dataclasses.replace(config.train, seed=config.seed, num_workers=corpus.workers)
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


def run_clean_finetune(clip: ClipModel, config: AttackConfig, run_dir: str | Path | None = None,
                       resume: bool | str = False, captions: str | Captions = "fmnist") -> tuple[ClipModel, None, dict]:
    """The control of an attack: ``clip`` fine-tuned in place with ``config``'s recipe on the pairs an
    attack of the same seed draws (:func:`pair_sample`), none poisoned; no trigger is built.

    Returns (model, None, finetune record): ``clean`` True, ``poison_rate`` 0, the pairs, seed,
    corpus and train settings, the steps and time. It is stored as ``finetune`` in config.json
    (:func:`save_backdoored`), so evaluation measures no ASR and a detector zoo counts it negative.
    """
    captions = as_captions(captions)
    corpus = captions.load(clip.image_size)
    corpus = corpus if hasattr(corpus, "caption") else LabelledCorpus(corpus)
    pairs = CaptionedImages(pair_sample(corpus, config), config.seed)
    train_config = dataclasses.replace(config.train, seed=config.seed, num_workers=corpus.workers)
    record = {"clean": True, "poison_rate": 0.0, "pairs": config.pairs, "seed": config.seed,
              "captions": str(captions), "train": asdict(config.train)}
    settings = {"finetune": {k: v for k, v in record.items() if k != "train"}, "model": clip.fingerprint()}
    clip.requires_grad_(True)
    try:
        result: FitResult = fit(ContrastiveTask(clip), pairs, train_config, run_dir, resume, caption_collate(clip),
                                "clean fine-tune", settings=settings)
    finally:
        clip.requires_grad_(False)
    record.update(total_pairs=len(pairs), finetune_seconds=round(result.seconds, 1), steps=result.steps)
    return clip, None, record


def save_backdoored(clip: ClipModel, trigger: Trigger | None, record: dict, directory: str | Path) -> Path:
    """A model directory of :func:`run_attack`'s result; a clean fine-tune (``trigger`` None) records
    ``finetune`` and writes no trigger file."""
    if trigger is None:
        return save_clip(clip, directory, extra={"finetune": record})
    return save_clip(clip, directory, extra={"attack": record}, tensor_files={TRIGGER_FILE: trigger.state_dict()})


def load_trigger(model_dir: str | Path, record: dict) -> Trigger:
    """The exact trigger a backdoored model directory was made with."""
    path = Path(model_dir) / TRIGGER_FILE
    settings = dict(record["trigger"])
    files = {name: settings[name] for name in get_trigger_class(record["name"]).file_settings if name in settings}
    if path.exists():  # the saved state holds what a file setting made (WaNet's grid_file): not read again
        settings.update(dict.fromkeys(files))
    trigger = build_trigger(record["name"], record["image_size"], **settings)
    if path.exists():
        state = read_safetensors(path)
        check_finite(state, path)
        trigger.load_state_dict(state)
        for name, value in files.items():
            setattr(trigger.config, name, value)
    elif trigger.learned:
        raise ClipguardError(f"{path} is missing: the {trigger.name} trigger cannot be rebuilt without it")
    return trigger
