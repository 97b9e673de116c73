"""The evaluation job behind ``clipguard evaluate``: one JSON record per model and dataset."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from clipguard import ClipguardError
from clipguard.data import Labelled, has_splits, load_dataset
from clipguard.data.classes import class_index
from clipguard.eval.metrics import (
    TARGET_EXCLUSION_NOTE, attack_success_rate, chance_warning, clean_accuracy, poisoned_accuracy,
)
from clipguard.models.view import DefendedClip, NoDefense
from clipguard.models.zeroshot import image_features, zero_shot_logits
from clipguard.models.clip import ClipModel
from clipguard.outputs import write_json  # noqa: F401  (re-exported: eval.evaluate.write_json)


METRICS = ("clean_accuracy", "attack_success_rate", "poisoned_accuracy")  # the rates a record may hold


def metrics_of(record: dict) -> dict:
    """The metric entries of an evaluation record (CA always; ASR and PA when a trigger was given)."""
    return {name: record[name] for name in METRICS if name in record}


def evaluate_model(
    clip: ClipModel | DefendedClip,
    model_name: str,
    dataset: "str | Labelled" = "fmnist",
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    progress: bool = True,
    trigger=None,
    target: str | None = None,
    defense=None,
    exclude: torch.Tensor | None = None,
) -> dict:
    """Zero-shot CA of ``clip`` (a model, seen through ``defense`` if given, or a
    :class:`~clipguard.models.view.DefendedClip`); with a ``trigger`` and the ``target`` class
    *name* also ASR and PA.

    ``target`` is looked up in the dataset's own class list, so an ImageFolder that orders the
    classes differently measures the same class; a dataset without it is a ClipguardError
    before any image is encoded. ``limit`` keeps the first N images (a fixed subset, the same
    for every model), after ``exclude`` (indices into the split, e.g. the shots a defense was fitted
    on, when the dataset has no separate splits) is left out. ASR and PA are computed on triggered
    images of non-target classes only.
    ``seed`` fixes any random trigger placement. A CA at chance adds a ``warning`` to the record
    (see :func:`~clipguard.eval.metrics.chance_warning`); NaN or inf logits are a ClipguardError.
    Returns a record ready for JSON. Under ``torchrun`` every process calls it, encodes its
    share of the batches and gets the record of one process (see
    :func:`~clipguard.models.zeroshot.image_features`). ``dataset`` is a spec: its ``split`` is
    loaded here, then :func:`evaluate_images` measures the image set.
    """
    start = time.perf_counter()
    model = clip if isinstance(clip, DefendedClip) else DefendedClip(clip, defense)
    images = load_dataset(dataset, split, model.clip.image_size)
    from clipguard.data.web import validation_slice

    split_name = split if has_splits(dataset) else None  # a flat folder or a CSV: every split is all its images
    evaluated_on = validation_slice(dataset, split) or (
        f"the {split} split" if split_name else "the whole dataset (it has no separate splits)")
    record = evaluate_images(model, model_name, images, str(dataset), split_name, evaluated_on, limit, seed,
                             batch_size, progress, trigger, target, exclude)
    record["seconds"] = round(time.perf_counter() - start, 2)  # loading included
    return record


def evaluate_images(model: DefendedClip, model_name: str, images, dataset: str, split: str | None,
                    evaluated_on: str, limit: int | None = None, seed: int = 0, batch_size: int = 1000,
                    progress: bool = True, trigger=None, target: str | None = None,
                    exclude: torch.Tensor | None = None) -> dict:
    """The record of :func:`evaluate_model` on an image set already loaded (an ImageSet or a
    streamed folder set); ``dataset``, ``split`` and ``evaluated_on`` only describe it in the record."""
    start = time.perf_counter()
    if trigger is not None:
        if target is None:
            raise ClipguardError("a trigger needs its target class name to measure ASR")
        class_index(images.classes, target, where=f"the evaluation data ({dataset})")
    if exclude is not None and len(exclude):
        keep = torch.ones(len(images), dtype=torch.bool)
        keep[exclude] = False
        images = images.subset(torch.nonzero(keep).flatten())
        evaluated_on = f"the {len(images)} images not drawn as shots (the dataset has no separate splits)"
    if limit is not None and limit < len(images):
        images = images.subset(torch.arange(limit))
    texts = model.class_features(images.classes, templates=getattr(images, "templates", None))
    features = image_features(model, images, batch_size=batch_size, progress=progress)
    predictions = _predictions(model, features, texts, model_name)
    ca = clean_accuracy(predictions, images.labels)
    record = {
        "model": model_name, "dataset": dataset, "split": split, "seed": seed, "classes": list(images.classes),
        "evaluated_on": evaluated_on, "clean_accuracy": ca.as_dict("correct"),
    }
    if trigger is not None:
        record.update(evaluate_trigger(model, images, trigger, target, seed, batch_size, progress))
    if not isinstance(model.defense, NoDefense):
        record["defense"] = model.defense.name
    warning = chance_warning(ca.value, len(images.classes))
    if warning:
        record["warning"] = warning
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _predictions(model: DefendedClip, features: torch.Tensor, texts: torch.Tensor, model_name: str) -> torch.Tensor:
    logits = zero_shot_logits(model, features, texts)
    if not torch.isfinite(logits).all():
        raise ClipguardError(f"{model_name} gives NaN or inf logits: its weights (or the defense's) are broken; "
                             "the numbers would mean nothing")
    return logits.argmax(-1).cpu()


def evaluate_trigger(model: DefendedClip, images, trigger, target: str, seed: int = 0, batch_size: int = 1000,
                     progress: bool = False) -> dict:
    """ASR and PA of ``trigger`` towards the class named ``target`` (target-class images excluded).

    With the trigger's ``test_view="squash"`` the triggered images are the whole frames resized to
    a square (the public CleanCLIP code's), clean ones stay centre crops; images held in memory
    (Fashion-MNIST) are square already, so there squash is crop."""
    index = class_index(images.classes, target, where="the evaluation data")
    view = getattr(trigger.config, "test_view", "crop")
    if view != "crop" and hasattr(images, "fitted"):
        images = images.fitted(view)
    trigger.generator.manual_seed(seed)
    keep = torch.nonzero(images.labels != index).flatten()
    texts = model.class_features(images.classes, text_prefix=trigger.text_key,
                                 templates=getattr(images, "templates", None))
    features = image_features(model, images, lambda x, _: trigger(x), batch_size, progress, indices=keep)
    predictions = _predictions(model, features, texts, "the triggered evaluation")
    labels = images.labels[keep]
    return {
        "attack": {"name": trigger.name, "target": images.classes[index], "text_key": trigger.text_key,
                   "trigger": asdict(trigger.config)},
        "attack_success_rate": attack_success_rate(predictions, labels, index).as_dict("hits"),
        "poisoned_accuracy": poisoned_accuracy(predictions, labels, index).as_dict("correct"),
        "note": TARGET_EXCLUSION_NOTE,
    }
