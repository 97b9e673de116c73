"""The benchmark: every attack x every defense x seeds, cached by config hash, resumable.

``run_bench`` backdoors the clean model once per (attack, seed), applies every defense to
each backdoored model, and evaluates each cell (CA, ASR, PA with integer counts, wall time, its own
peak memory (:class:`~clipguard.device.PeakMemory`), trainable parameters). Every finished piece is
on disk before the next starts:

    OUT/models/{attack}-s{seed}/         backdoored model directory (as ``clipguard attack``)
    OUT/defenses/{attack}-s{seed}/{m}/   learned prompt defense directory (prompt methods)
    OUT/cells/{attack}-s{seed}/{m}.json  one evaluated cell
    OUT/results.json, results.md, *.png, report.html

Each model and cell stores the key of what made it (:mod:`clipguard.keys`); a re-run reuses
what matches and recomputes only what is missing or was made with other settings, so an
interrupted run resumes where it stopped. Under ``torchrun`` every process runs the same
cells (training and evaluation are DDP-sharded) and only rank 0 writes.

Example::

    config = BenchConfig(attacks=["badnet"], defenses=["none", "rvpt"], seeds=[0])
    records = run_bench(config, "runs/bench")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import clipguard
from clipguard import ClipguardError, keys
from clipguard.attacks import ATTACKS, AttackConfig, get_trigger_class, load_trigger, run_attack, save_backdoored
from clipguard.attacks.poison import target_of
from clipguard.config import override, parse_assignments
from clipguard.data import Captions, Labelled
from clipguard.data.pool import DefenderData, Unlabelled
from clipguard.device import PeakMemory
from clipguard.distributed import barrier, init_distributed, is_main_process
from clipguard.eval.evaluate import METRICS, write_json
from clipguard.keys import cell_key, record_key, without_device
from clipguard.models.clip import ClipModel
from clipguard.models.loading import load_clip, resolve_device
from clipguard.outputs import remove_run_directory
from clipguard.pipeline import NO_DEFENSE, defend, defended_methods, defense_config, evaluate

logger = logging.getLogger(__name__)

def all_defenses() -> list[str]:
    """``none`` first, then the defenses on top of the suspect, then those rewriting its weights."""
    return defended_methods()


@dataclass
class BenchConfig:
    model: str = "builtin"  # the clean model every attack starts from
    attacks: list[str] = field(default_factory=lambda: sorted(ATTACKS))  # attack names
    defenses: list[str] = field(default_factory=all_defenses)  # defense names, "none" = the backdoored model
    seeds: list[int] = field(default_factory=lambda: [0])  # each seed re-runs attack and defense
    shots: int = 16  # clean labelled images per class for the few-shot defenses
    limit: int | None = None  # evaluate on the first N test images only (None: all 10k)
    attack: AttackConfig = field(default_factory=AttackConfig)  # attack settings (name and seed set per cell)
    trigger_settings: dict[str, dict] = field(default_factory=dict)  # attack -> {trigger field: value} overrides
    defense_settings: dict[str, dict] = field(default_factory=dict)  # method -> {field: value} overrides
    dataset: str = "fmnist"  # labelled images: the shots (train split) and the evaluation (test/val split)
    captions: str = "fmnist"  # image-caption pairs: the attacks' poisoning corpus and the clean pairs
    classnames: str | None = None  # a file overriding the dataset's class names
    templates: str | None = None  # a file overriding the dataset's prompt templates
    csv_separator: str = ","  # a csv: spec's separator and columns (open_clip's --csv-* flags)
    csv_img_key: str = "filepath"
    csv_caption_key: str = "caption"
    csv_label_key: str = "label"  # a labelled csv: spec's label column (--csv-label-key)
    workers: int = 0  # DataLoader worker processes decoding a user's images
    pool: str = "fmnist-train:2000"  # oracle-repair: the defender's unlabelled pool (any data spec)
    pool_size: int | None = None  # images of the pool (None: 2000; fmnist-train:N gives its own N, another is refused)
    pool_trigger_rate: float = 0.1  # oracle-repair: share of the pool carrying the model's trigger
    pr_images: int = 200  # test images for the PR curves (suspect vs VPT vs RVPT); 0: no PR figure
    device: str = "auto"  # auto | cpu | cuda
    title: str = "clipguard benchmark"  # the report's heading

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"BenchConfig.attacks: unknown {unknown}; choose from {sorted(ATTACKS)}")
        bad = [d for d in self.defenses if d not in all_defenses()]
        if bad:
            raise ValueError(f"BenchConfig.defenses: unknown {bad}; choose from {all_defenses()}")
        if not self.seeds:
            raise ValueError("BenchConfig.seeds must name at least one seed")
        if self.shots < 1:
            raise ValueError(f"BenchConfig.shots must be >= 1, got {self.shots}")
        if self.attack.clean:
            raise ValueError(BENCH_CLEAN)
        self.pool_spec.check()  # a pool size the pool's own N contradicts: refused now

    @property
    def labelled(self) -> Labelled:
        return Labelled(self.dataset, self.classnames, self.templates, self.workers, self.csv_separator,
                        self.csv_img_key, self.csv_label_key)

    @property
    def caption_spec(self) -> Captions:
        return Captions(self.captions, self.csv_separator, self.csv_img_key, self.csv_caption_key, self.workers)

    @property
    def pool_spec(self) -> Unlabelled:
        return Unlabelled.given(self.pool, self.pool_size, self.pool_trigger_rate, self.caption_spec, self.workers)

    @property
    def defender_data(self) -> DefenderData:
        """The dataset, captions and pool every cell's defense may learn from (and its key)."""
        return DefenderData(self.labelled, self.caption_spec, self.pool_spec)


BENCH_CLEAN = ("BenchConfig.attack.poison_rate is 0: bench measures backdoors; a clean fine-tune is "
               "`clipguard attack --poison-rate 0`")


def attack_settings(config: BenchConfig, attack: str, seed: int) -> AttackConfig:
    return dataclasses.replace(config.attack, attack=attack, seed=seed)


def attack_key(config: BenchConfig, attack: AttackConfig) -> str:
    """The key of the model ``attack`` makes from ``config.model`` (:func:`clipguard.keys.attack_key`)."""
    source, image_size = clean_source(config.model)
    return keys.attack_key(source, image_size, attack, config.trigger_settings.get(attack.attack), config.defender_data)


@functools.lru_cache(maxsize=8)
def clean_source(model: str) -> tuple[str, int]:
    """The ``source`` a model directory made from ``model`` records (what the key compares), and
    the model's image size."""
    clip = load_clip(model, device="cpu")
    return clip.config.get("source", model), clip.image_size


def defense_settings(config: BenchConfig, method: str, seed: int):
    """The method's config dataclass for one cell ({} for no defense)."""
    if method == NO_DEFENSE:
        return {}
    return defense_config(method, seed, config.device, config.shots, config.defense_settings.get(method, {}))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by an older, non-atomic writer: recompute


# ------------------------------------------------------------------------- the models
def model_directory(out: Path, attack: str, poison_rate: float, seed: int) -> Path:
    return out / "models" / f"{attack}-p{poison_rate:g}-s{seed}"


def backdoored_model(config: BenchConfig, attack: str, seed: int, out: Path) -> tuple[ClipModel, Path, str, dict]:
    """The backdoored model of (attack, seed): from the cache when its settings match, else made now."""
    settings = attack_settings(config, attack, seed)
    key = attack_key(config, settings)
    directory = model_directory(out, attack, settings.poison_rate, seed)
    saved = _read_json(directory / "config.json")
    if saved and "attack" in saved and record_key(saved.get("source", ""), saved["attack"]) == key:
        return load_clip(str(directory), device=config.device), directory, key, {"cached": True}
    logger.info("backdooring %s (seed %d) -> %s", attack, seed, directory)
    clip = load_clip(config.model, device=config.device)
    start = time.perf_counter()
    run_dir = out / "runs" / directory.name  # checkpoints of an unfinished fine-tune
    # an interrupted fine-tune of the same settings continues from its checkpoint
    clip, trigger, record = run_attack(clip, settings, config.trigger_settings.get(attack), run_dir=run_dir,
                                       resume="matching", captions=config.caption_spec, dataset=config.labelled)
    clip.eval()
    record["bench_seconds"] = round(time.perf_counter() - start, 1)
    clip.config["attack"] = record  # as a reload of the directory would have it
    if is_main_process():
        save_backdoored(clip, trigger, record, directory)  # atomic: a directory is there only when finished
        remove_run_directory(run_dir)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()  # OUT/runs/, once no unfinished fine-tune is left in it
    barrier()
    return clip, directory, key, {"cached": False, "seconds": record["bench_seconds"]}


def run_cell(config: BenchConfig, attack: str, seed: int, method: str, clip: ClipModel, model_dir: Path,
             model_key: str, out: Path) -> dict:
    """One evaluated (attack, seed, defense) cell, from the cache when its settings match."""
    settings = defense_settings(config, method, seed)
    key = cell_key(model_key, method, settings, config.limit, config.defender_data)
    path = out / "cells" / f"{attack}-s{seed}" / f"{method}.json"
    cached = _read_json(path)
    if cached and cached.get("key") == key:
        return cached
    logger.info("cell %s / %s / seed %d", attack, method, seed)
    memory = PeakMemory(resolve_device(config.device))  # the cell's own peak, whatever ran before it
    start = time.perf_counter()
    defended = defend(clip, method, config=settings or None, data=config.defender_data, suspect_dir=model_dir)
    stats = defended.stats
    if defended.defense is not None and not defended.defense.rewrites_weights and is_main_process():
        defended.defense.save(clip, out / "defenses" / f"{attack}-s{seed}" / method, stats)  # for the PR figures
    defense_seconds = time.perf_counter() - start
    trigger = load_trigger(model_dir, clip.config["attack"])
    target = target_of(clip.config["attack"])
    result = evaluate(defended, trigger=trigger, target=target, dataset=config.labelled, limit=config.limit,
                      seed=seed, progress=False, name=f"{attack}-s{seed}")
    record = {
        "attack": attack, "defense": method, "seed": seed, "key": key,
        **{name: result[name] for name in METRICS},
        "target": result["attack"]["target"], "test_images": result["clean_accuracy"]["total"],
        "defense_seconds": round(defense_seconds, 2), "eval_seconds": result["seconds"],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_memory_mb": memory.peak_mb(),
        "peak_memory_kind": memory.kind,
        "trainable_parameters": int(stats.get("trainable_parameters", 0)),
        "settings": settings if isinstance(settings, dict) else asdict(settings),
        "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))},
        "clipguard_version": clipguard.__version__,
    }
    if result.get("warning"):
        record["warning"] = result["warning"]
    if is_main_process():
        write_json(record, path)
    return record


def run_bench(config: BenchConfig, out: str | Path,
              on_cell: Callable[[dict], None] | None = None) -> list[dict]:
    """Run (or resume) the whole matrix; returns every cell record and writes the report."""
    from tqdm.auto import tqdm

    from clipguard.eval.report import RESULTS_MD, write_report
    from clipguard.outputs import check_bench_directory, mark_bench_directory

    out = Path(out)
    init_distributed(config.device)  # under torchrun: join the group before any collective
    if is_main_process():
        check_bench_directory(out)  # a folder of the user's files, or a results.md bench did not write: refused
        mark_bench_directory(out, out / RESULTS_MD)
    records: list[dict] = []
    jobs = [(attack, seed) for seed in config.seeds for attack in config.attacks]
    # one step per backdoored model and one per cell, so the first ETA is not a cell's
    bar = tqdm(total=len(jobs) * (1 + len(config.defenses)), desc="bench (backdoors + cells)", unit="step",
               disable=not is_main_process())
    for attack, seed in jobs:
        bar.set_postfix_str(f"{attack} seed {seed}: backdoor")
        suspect, model_dir, model_key, _ = backdoored_model(config, attack, seed, out)
        bar.update()
        for method in config.defenses:
            bar.set_postfix_str(f"{attack} seed {seed}: {method}")
            # a defense never changes the suspect, so no defense sees another's changes
            record = run_cell(config, attack, seed, method, suspect, model_dir, model_key, out)
            records.append(record)
            if on_cell is not None:
                on_cell(record)
            bar.update()
    bar.close()
    if is_main_process():
        figures = write_figures(config, out)
        write_report(records, out, config_summary(config), extra_images=figures)
        mark_bench_directory(out, out / RESULTS_MD)
    barrier()
    return records


def write_figures(config: BenchConfig, out: Path) -> list[str]:
    """The trigger grid of the first seed's models, and PR curves (suspect vs VPT vs RVPT) per attack."""
    from clipguard.defenses import DefendedClip, load_defense
    from clipguard.eval.bench_figures import write_figures as draw_figures

    seed = config.seeds[0]
    test = config.labelled.load("test", clean_source(config.model)[1])
    models = {a: model_directory(out, a, config.attack.poison_rate, seed) for a in config.attacks}
    records = {a: json.loads((d / "config.json").read_text())["attack"] for a, d in models.items()}
    triggers = [load_trigger(models[a], records[a]) for a in config.attacks]
    compared = [m for m in ("vpt", "rvpt") if m in config.defenses]

    def load_attack(attack: str):
        clip = load_clip(str(models[attack]), device=config.device)
        views = {"suspect": DefendedClip(clip)}
        for method in compared:
            views[method] = DefendedClip(clip, load_defense(out / "defenses" / f"{attack}-s{seed}" / method, clip,
                                                            test.classes))
        return views, load_trigger(models[attack], records[attack])

    return draw_figures(out, test, triggers, {a: target_of(records[a]) for a in config.attacks}, seed,
                        config.pr_images, load_attack if compared else None)


def config_summary(config: BenchConfig) -> dict:
    return {"title": config.title, "model": config.model, "attacks": config.attacks, "defenses": config.defenses, "seeds": config.seeds,
            "shots": config.shots, "limit": config.limit, "attack": without_device(asdict(config.attack)),
            "trigger_settings": config.trigger_settings, "defense_settings": config.defense_settings,
            "dataset": config.dataset, "captions": config.captions, "pool": config.pool,
            "pool_trigger_rate": config.pool_trigger_rate, "clipguard_version": clipguard.__version__}


def parse_bench_settings(config: BenchConfig, assignments: list[str] | None) -> BenchConfig:
    """``--set attack.FIELD=V`` (AttackConfig, dotted for train.*), ``--set ATTACK.FIELD=V`` (that
    attack's trigger) or ``--set METHOD.FIELD=V`` (a defense's config)."""
    attack_items, per_method, per_trigger = [], {}, {}
    for item in assignments or []:
        head, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise ClipguardError(f"--set {item!r}: expected attack.FIELD=VALUE or METHOD.FIELD=VALUE")
        if head == "attack":
            attack_items.append(rest)
        elif head in ATTACKS:
            per_trigger.setdefault(head, []).append(rest)
        elif head in all_defenses() and head != NO_DEFENSE:
            per_method.setdefault(head, []).append(rest)
        else:
            raise ClipguardError(f"--set {item!r}: {head!r} is neither 'attack', an attack nor a defense "
                                 f"({all_defenses()[1:]})")
    attack = override(config.attack, **parse_assignments(AttackConfig, attack_items)) if attack_items else config.attack
    if attack.clean:
        raise ClipguardError(BENCH_CLEAN)
    settings = dict(config.defense_settings)
    for method, items in per_method.items():
        probe = defense_settings(config, method, 0)
        settings[method] = {**settings.get(method, {}), **parse_assignments(type(probe), items)}
    triggers = dict(config.trigger_settings)
    for name, items in per_trigger.items():
        triggers[name] = {**triggers.get(name, {}), **parse_assignments(get_trigger_class(name).config_class, items)}
    return dataclasses.replace(config, attack=attack, trigger_settings=triggers, defense_settings=settings)


# The demo's shortened attack recipe (BenchConfig.attack): measured to fit the 10-minute budget
# on 2 CPU cores together with the defenses; see README "Demo".
DEMO_ATTACK = {"pairs": 2000, "poison_rate": 0.15, "train.epochs": 10}  # 300 poisoned pairs, as the default
DEMO_TRIGGERS = {"badclip": {"steps": 100}}
DEMO_LIMIT = 2000


def demo_config(seed: int = 0, device: str = "auto") -> BenchConfig:
    """``clipguard demo``: BadNet and BadCLIP on the built-in model x {none, RVPT, CBPT}."""
    return BenchConfig(attacks=["badnet", "badclip"], defenses=[NO_DEFENSE, "rvpt", "cbpt"], seeds=[seed],
                       limit=DEMO_LIMIT, attack=override(AttackConfig(), **DEMO_ATTACK), trigger_settings=DEMO_TRIGGERS,
                       pr_images=0, device=device, title="clipguard demo")
