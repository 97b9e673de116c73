"""The steps every entry point shares: load a model, backdoor it, draw shots, defend, evaluate, save.

``clipguard attack``, ``evaluate`` and ``defend``, the bench's cells and the ``benchmarks/`` scripts
all run through these functions, and they are the Python API::

    from clipguard import pipeline
    from clipguard.attacks import AttackConfig

    clip = pipeline.load_model("builtin")
    suspect, trigger, record = pipeline.backdoor(clip, AttackConfig(attack="badnet", target="bag"))
    defended = pipeline.defend(suspect, "rvpt", shots=16, seed=0)
    result = pipeline.evaluate(defended, trigger=trigger, target="bag")
    pipeline.save(defended, "runs/badnet-rvpt")

Every defense is a registered :class:`~clipguard.defenses.Defense`; what it learns from
(``Defense.data``) and whether it rewrites the weights (``Defense.rewrites_weights``) are class
attributes, so nothing here tests a method's name.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, load_trigger, run_attack, save_backdoored
from clipguard.config import override
from clipguard.data import (
    Captions, FolderImages, ImageSet, Labelled, as_captions, few_shot_indices, has_splits, load_dataset,
)
from clipguard.data.classes import class_index
from clipguard.data.pool import DefenderData
from clipguard.defenses import DEFENSES, Defense, Pool, get_defense_class
from clipguard.eval.evaluate import evaluate_model
from clipguard.models.clip import ClipModel
from clipguard.models.loading import load_clip
from clipguard.models.view import DefendedClip

NO_DEFENSE = "none"  # the suspect model as it is


def load_model(spec: str = "builtin", device: str = "auto", verify: bool = True) -> ClipModel:
    """A CLIP from a model spec (``builtin``, ``ViT-B-32:openai``, a model directory, a state dict)."""
    return load_clip(spec, device=device, verify=verify)


def backdoor(clip: ClipModel, config: AttackConfig | None = None, trigger_settings: dict | None = None,
             run_dir: str | Path | None = None, resume: bool | str = False, captions: str | Captions = "fmnist",
             dataset: str | Labelled = "fmnist"):
    """Backdoor ``clip`` in place by poisoned contrastive fine-tuning on the ``captions`` corpus:
    (model, trigger, attack record). A caption corpus takes its classes from ``dataset``."""
    clip, trigger, record = run_attack(clip, config or AttackConfig(), trigger_settings, run_dir=run_dir, resume=resume,
                                       captions=captions, dataset=dataset)
    clip.eval()
    clip.config["finetune" if trigger is None else "attack"] = record  # as a reload of the saved directory would have it
    return clip, trigger, record


def check_attack_target(config: AttackConfig, captions: str | Captions = "fmnist",
                        dataset: str | Labelled = "fmnist") -> None:
    """Refuse (ClipguardError, before any work) a target outside the attacker's classes: the
    built-in corpus's own, else ``dataset``'s (a clean fine-tune has no target)."""
    own = as_captions(captions).classes
    classes = own or load_dataset(dataset, "test").classes
    if not config.clean:
        class_index(classes, config.target, where=f"the attacker's classes ({captions if own else dataset})")


def attack(clip: ClipModel, config: AttackConfig, out: str | Path, trigger_settings: dict | None = None,
           run_dir: str | Path | None = None, resume: bool | str = False, captions: str | Captions = "fmnist",
           dataset: str | Labelled = "fmnist", seed: int = 0) -> tuple[dict, dict]:
    """``clipguard attack``: :func:`backdoor` ``clip``, :func:`evaluate` it on ``dataset``'s test split
    (with its trigger, ``seed`` placing it), and save it as the model directory ``out`` (also the
    evaluation's model name), the metrics in its attack record and the evaluation as ``eval.json``:
    (attack record, evaluation)."""
    from clipguard.eval.evaluate import metrics_of
    from clipguard.outputs import write_json

    clip, trigger, record = backdoor(clip, config, trigger_settings, run_dir, resume, captions, dataset)
    result = evaluate(clip, trigger=trigger, target=record.get("target"), dataset=dataset, seed=seed, name=str(out))
    record["evaluation"] = metrics_of(result)
    save_backdoored(clip, trigger, record, out)
    write_json(result, Path(out) / "eval.json")
    return record, result


def draw_shots(shots: int, seed: int = 0, dataset: str | Labelled = "fmnist", image_size: int = 28,
               with_index: bool = False):
    """``shots`` clean labelled images per class from ``dataset``'s train split (the whole folder
    when it has no splits), seeded. Only the shots are decoded. ``with_index``: also their
    positions in that split, (shots, index)."""
    train = load_dataset(dataset, "train", image_size)
    index = few_shot_indices(train.labels, shots, seed, len(train.classes))
    return (train.subset(index), index) if with_index else train.subset(index)


def defense_config(method: str, seed: int = 0, device: str = "auto", shots: int | None = None,
                   settings: dict[str, Any] | None = None):
    """The config dataclass of ``method`` with ``seed``, ``device``, ``shots`` (for methods that take
    shots) and ``settings`` (field -> value, dotted for nested fields) applied."""
    cls = get_defense_class(method).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {"seed": seed, "device": device, **({"shots": shots} if "shots" in fields else {})}
    return override(cls(), **values, **(settings or {}))


def defense_data(cls: type[Defense], config, suspect: ClipModel, data: DefenderData, trigger=None):
    """(what ``cls.fit`` learns from, the shots' positions or None): shots of ``data.dataset`` drawn
    under the config's seed, the images of ``data.pool``, or the ``data.captions`` corpus (pairs)."""
    if cls.data == "shots":
        return draw_shots(config.shots, config.seed, data.dataset, suspect.image_size, with_index=True)
    if cls.data == "pool":
        if data.pool is None:
            raise ClipguardError(f"{cls.name} needs an unlabelled pool (--pool SPEC: fmnist-train:N, a folder, "
                                 "csv:FILE or wds:SHARDS)")
        if data.pool.trigger_rate and trigger is None:
            raise ClipguardError("--pool-trigger-rate needs a backdoored model directory (its trigger is mixed in)")
        images, info = data.pool.load(suspect.image_size, seed=config.seed, trigger=trigger)
        return Pool(images, info), None
    return data.captions.load(suspect.image_size), None


@dataclass
class Defended:
    """A suspect and what a defense made of it (``defense`` None: no defense)."""

    suspect: ClipModel
    defense: Defense | None
    stats: dict = field(default_factory=dict)
    suspect_dir: str | None = None  # the suspect's directory, when it was loaded from one
    dataset: str | Labelled = "fmnist"  # the labelled spec the shots came from
    shots_index: torch.Tensor | None = None  # their positions in its train split (shot defenses)

    @property
    def model(self) -> ClipModel:
        """The CLIP whose weights evaluation uses: the rewritten copy, or the suspect."""
        if self.defense is not None and self.defense.rewrites_weights:
            return self.defense.model
        return self.suspect

    @property
    def view(self) -> DefendedClip:
        return self.defense.view(self.suspect) if self.defense is not None else DefendedClip(self.suspect)

    @property
    def name(self) -> str:
        return self.defense.name if self.defense is not None else NO_DEFENSE


def defend(suspect: ClipModel, method: str, shots: int | None = None, seed: int = 0, device: str = "auto",
           settings: dict[str, Any] | None = None, config=None, data: DefenderData | None = None,
           suspect_dir: str | Path | None = None) -> Defended:
    """Fit defense ``method`` for ``suspect`` (never changed) and return the defended model.

    ``config`` (the method's config dataclass) replaces ``shots``/``seed``/``device``/``settings``.
    ``data``: what the defender holds (:class:`~clipguard.data.pool.DefenderData`, default the
    built-in data and no pool): a shot defense draws shots of ``data.dataset`` (its train split,
    or the whole folder when it has none; :func:`evaluate` then leaves the shots out), a pairs
    defense reads ``data.captions``, a pool defense ``data.pool``, whose ``trigger_rate`` > 0
    mixes the suspect's own trigger (read from ``suspect_dir``) into that share of it, a simulation::

        pipeline.defend(suspect, "oracle-repair", data=DefenderData(pool="fmnist-train:2000"))

    ``method="none"``: the suspect as it is.
    """
    if method == NO_DEFENSE:
        return Defended(suspect, None, {"seconds": 0.0, "trainable_parameters": 0}, _str(suspect_dir))
    data = data or DefenderData()
    cls = get_defense_class(method)
    config = config or defense_config(method, seed, device, shots, settings)
    cls.check_model(config, suspect)  # before any data is read
    trigger = None
    if cls.data == "pool" and data.pool is not None and data.pool.trigger_rate:
        record = suspect.config.get("attack")
        trigger = load_trigger(suspect_dir, record) if record and suspect_dir else None
    learned_from, index = defense_data(cls, config, suspect, data, trigger)
    defense = cls(config, suspect, _class_names(suspect, learned_from, data.dataset)).to(suspect.device)
    start = time.perf_counter()
    stats = defense.fit(suspect, learned_from)
    stats.setdefault("seconds", round(time.perf_counter() - start, 2))
    return Defended(suspect, defense, stats, _str(suspect_dir), data.dataset, index)


def _str(path) -> str | None:
    return None if path is None else str(path)


def _class_names(suspect: ClipModel, data, dataset: str | Labelled) -> tuple[str, ...]:
    """The shots' classes; for a pool or pairs defense the model's own, else the dataset's."""
    if isinstance(data, (ImageSet, FolderImages)):
        return data.classes
    return tuple(suspect.config.get("classes") or load_dataset(dataset, "test", suspect.image_size).classes)


def load_defended(suspect: ClipModel, directory: str | Path | None = None, dataset: str | Labelled = "fmnist",
                  split: str = "test", verify: bool = True) -> Defended:
    """``suspect`` through the defense directory ``directory`` (as :func:`save` writes it, learned for
    the classes of ``dataset``'s ``split``), or as it is (``directory`` None)."""
    if not directory:
        return Defended(suspect, None)
    from clipguard.defenses import load_defense

    classes = load_dataset(dataset, split, suspect.image_size).classes
    return Defended(suspect, load_defense(directory, suspect, classes, verify=verify))


def evaluate(model: ClipModel | Defended, trigger=None, target: str | None = None, dataset: str | Labelled = "fmnist",
             split: str = "test", limit: int | None = None, seed: int = 0, batch_size: int = 1000,
             progress: bool = True, name: str | None = None) -> dict:
    """CA (and with ``trigger`` + ``target`` name, ASR and PA) of a model or a defended model.

    A defense fitted on shots of a dataset without separate splits is evaluated on its other images."""
    defended = model if isinstance(model, Defended) else Defended(model, None)
    label = name or defended.suspect_dir or (defended.name if defended.defense is not None else "model")
    same = str(dataset) == str(defended.dataset)
    shots_here = defended.shots_index is not None and same and not has_splits(dataset)
    return evaluate_model(defended.view, label, dataset, split, limit, seed, batch_size, progress,
                          trigger=trigger, target=target, exclude=defended.shots_index if shots_here else None)


def save(defended: Defended, directory: str | Path, evaluation: dict | None = None) -> Path:
    """Write the defense (a defense directory, or a model directory for a weight-rewriting defense)
    with its stats, and ``evaluation`` as ``eval.json`` beside them."""
    from clipguard.eval.evaluate import metrics_of
    from clipguard.outputs import write_json

    if defended.defense is None:
        raise ClipguardError("nothing to save: no defense was applied")
    stats = dict(defended.stats)
    if evaluation is not None:
        stats["evaluation"] = metrics_of(evaluation)
    source = defended.suspect_dir if defended.suspect_dir and Path(defended.suspect_dir).is_dir() else None
    path = defended.defense.save(defended.suspect, directory, stats, source_dir=source)
    if evaluation is not None:
        write_json(evaluation, Path(directory) / "eval.json")
    return path


def defended_methods() -> list[str]:
    """``none`` first, then the defenses on top of the suspect, then those rewriting its weights."""
    return [NO_DEFENSE, *sorted(DEFENSES, key=lambda m: (DEFENSES[m].rewrites_weights, m))]


def detect(clip: ClipModel, shots: int = 16, seed: int = 0, dataset: str | Labelled = "fmnist",
           reference: ClipModel | str | None = None, detectors: list[str] | None = None, device: str = "auto",
           settings: dict[str, dict] | None = None, config=None):
    """Is ``clip`` backdoored? ``shots`` clean images per class of ``dataset`` (seeded), every
    registered detector the data allows (or ``detectors``), and a verdict calibrated on the model's
    own classes, or against ``reference`` (the clean base model, or its spec). ``settings``:
    detector name -> config fields; ``config``: a :class:`~clipguard.detection.verdict.VerdictConfig`.
    Returns a :class:`~clipguard.detection.report.DetectionReport` (``.verdict``, ``.target_name``,
    ``.as_dict()``)::

        report = pipeline.detect(pipeline.load_model("runs/badnet"), shots=16, reference="builtin")
    """
    from clipguard.detection.verdict import scan

    name = reference if isinstance(reference, str) else "model"
    if isinstance(reference, str):
        reference = load_clip(reference, device=device)
    images = draw_shots(shots, seed, dataset, clip.image_size)
    return scan(clip, images, detectors, reference, config, settings, seed=seed, device=device, reference_name=name)
