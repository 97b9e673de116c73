"""The defender's unlabelled pool (``--pool``) and the defender's data as one object.

A pool is any data spec with labels and captions ignored (:func:`~clipguard.data.specs.load_unlabelled`),
or ``fmnist-train:N`` / ``fmnist-test:N``, which name their own size. :class:`DefenderData` holds
what a defense may learn from: the labelled ``dataset`` (shots), the ``captions`` corpus (clean
pairs) and the ``pool``; each spec's ``key()`` is what it adds to a cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from clipguard import ClipguardError
from clipguard.data.specs import Captions, Labelled, load_dataset, load_unlabelled, sample_images

COUNTED_POOLS = ("fmnist-train", "fmnist-test")  # pools whose spec may name their size: fmnist-train:N
DEFAULT_POOL_SIZE = 2000  # the commands' pool size when neither --pool-size nor the spec names one


@dataclass(frozen=True)
class Unlabelled:
    """An unlabelled-pool spec: ``size`` seeded images of it (None: all), ``trigger_rate`` of them
    carrying the suspect's trigger (a simulation, for measuring). ``fmnist-train:N`` names its own
    size; a ``size`` that differs from it is refused (:meth:`check`). A ``csv:`` pool is read with
    the separator and image column given here (open_clip's ``--csv-*`` options)."""

    spec: str
    size: int | None = None
    trigger_rate: float = 0.0
    csv_separator: str = ","
    csv_img_key: str = "filepath"
    workers: int | None = None

    def __str__(self) -> str:
        return self.spec

    @classmethod
    def given(cls, spec: str, size: int | None = None, trigger_rate: float = 0.0, captions: Captions | None = None,
              workers: int | None = None) -> "Unlabelled":
        """A pool as the commands take it (``--pool``, ``--pool-size``, ``--pool-trigger-rate``, the
        ``--csv-*`` options of ``captions``), checked: ``size`` None is the spec's own N, else
        :data:`DEFAULT_POOL_SIZE` images."""
        options = captions or Captions()
        pool = cls(spec, size, trigger_rate, options.csv_separator, options.csv_img_key, workers)
        if size is None and pool.own_size is None:
            pool = replace(pool, size=DEFAULT_POOL_SIZE)
        return pool.check()

    @property
    def own_size(self) -> int | None:
        """N of ``fmnist-train:N`` / ``fmnist-test:N``; None for any other spec."""
        name, _, count = self.spec.partition(":")
        if name not in COUNTED_POOLS or not count:
            return None
        if not count.isdigit():
            raise ClipguardError(f"pool {self.spec!r}: expected {name}:N with N a whole number")
        return int(count)

    @property
    def count(self) -> int | None:
        """The images drawn: the spec's own N, else ``size`` (None: all)."""
        own = self.own_size
        return own if own is not None else self.size

    def check(self) -> "Unlabelled":
        """Refuse (ClipguardError) a size that disagrees with the spec's own N."""
        own = self.own_size
        if own is not None and self.size is not None and self.size != own:
            raise ClipguardError(f"--pool {self.spec} names its own size ({own}) and --pool-size {self.size} "
                                 f"disagrees: give --pool {self.spec.partition(':')[0]}:{self.size}, or drop one")
        if not 0 <= self.trigger_rate <= 1:
            raise ClipguardError(f"pool trigger rate must be in [0, 1], got {self.trigger_rate}")
        return self

    def key(self) -> dict:
        """What the pool adds to a cache key: the spec, the triggered share, the size unless the spec
        names it, and a ``csv:`` pool's read options when not the defaults."""
        key = {"pool": self.spec, "pool_trigger_rate": self.trigger_rate}
        if self.own_size is None:
            key["pool_size"] = self.size
        options = [self.csv_separator, self.csv_img_key]
        if self.spec.startswith("csv:") and options != [",", "filepath"]:
            key["pool_read"] = options
        return key

    def load(self, image_size: int, seed: int = 0, trigger=None) -> tuple[torch.Tensor, dict]:
        """The pool as float (N, 3, H, W) in [0, 1] and what it holds (:func:`load_pool`); the
        trigger is mixed in only with a ``trigger`` and a ``trigger_rate`` above 0."""
        return load_pool(self.spec, image_size, seed, trigger, self.trigger_rate, self.size,
                         Captions(csv_separator=self.csv_separator, csv_img_key=self.csv_img_key), self.workers)


def load_pool(spec: str, image_size: int, seed: int = 0, trigger=None, trigger_rate: float = 0.0,
              size: int | None = None, captions: Captions | None = None,
              workers: int | None = None) -> tuple[torch.Tensor, dict]:
    """The defender's unlabelled pool as float (N, 3, H, W) in [0, 1], and what it holds.

    spec: any data spec, labels and captions ignored (:func:`~clipguard.data.specs.load_unlabelled`):
    ``fmnist``, a folder (every image under it), ``imagenet:DIR``, ``csv:FILE``, ``wds:SHARDS``;
    also ``fmnist-train:N`` / ``fmnist-test:N``. ``size`` seeded images of it are decoded and held
    (N of ``fmnist-*:N``; default all), the pool the oracle works on. ``captions``: the CSV options.
    With a ``trigger`` and ``trigger_rate`` > 0 a seeded share of the pool gets it: a simulated
    poisoned pool, for measuring; ``info["triggered"]`` lists those positions.
    """
    name = spec.partition(":")[0]
    if name in COUNTED_POOLS:
        own = Unlabelled(spec).own_size
        source, size = load_dataset("fmnist", name.split("-")[1]), own if own is not None else size
    else:
        source = load_unlabelled(spec, image_size, captions, workers)
    generator = torch.Generator().manual_seed(seed)  # draws the sample, then the triggered share
    images, _ = sample_images(source, size, generator)
    images = images.contiguous()  # expanded grey -> own memory
    info = {"spec": spec, "images": len(images), "seed": seed, "triggered": []}
    if trigger is not None and trigger_rate > 0:
        chosen = torch.randperm(len(images), generator=generator)[: round(trigger_rate * len(images))]
        trigger.generator.manual_seed(seed)
        images[chosen] = trigger(images[chosen].clone())
        info.update(trigger=trigger.name, trigger_rate=trigger_rate, triggered=sorted(chosen.tolist()))
    return images, info


@dataclass(frozen=True)
class DefenderData:
    """What a defense may learn from: shots of ``dataset``, pairs of ``captions``, or the ``pool``
    (None: no pool). Which one a defense reads is its class's ``data`` (shots | pairs | pool)."""

    dataset: Labelled = field(default_factory=Labelled)
    captions: Captions = field(default_factory=Captions)
    pool: Unlabelled | None = None

    def __post_init__(self):  # a plain string is that spec with its defaults
        for name, kind in (("dataset", Labelled), ("captions", Captions), ("pool", Unlabelled)):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, kind(value))

    def key(self, kind: str | None) -> dict:
        """What a defense learning from ``kind`` (None: no defense) adds to a cache key: the
        evaluation data always, and the pairs or the pool it learns from."""
        key = dict(self.dataset.key())
        if kind == "pairs":
            key.update(self.captions.key())
        if kind == "pool":
            if self.pool is None:
                raise ClipguardError("a pool defense needs an unlabelled pool (--pool SPEC)")
            key.update(self.pool.key())
        return key
