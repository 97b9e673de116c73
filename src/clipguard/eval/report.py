"""The benchmark's report: results.json, a paper-style results.md, bar plots and report.html.

Pure functions of the cell records that :mod:`clipguard.bench` writes (one record per
attack x defense x seed with CA/ASR/PA counts, times, memory and trainable parameters).

Example::

    write_report(records, "runs/bench", {"limit": None, "seeds": [0]})
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from clipguard.eval.evaluate import METRICS
from clipguard.eval.metrics import TARGET_EXCLUSION_NOTE

RESULTS_JSON, RESULTS_MD, BARS_PNG, REPORT_HTML = "results.json", "results.md", "asr_ca.png", "report.html"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _percent(values: Sequence[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f}±{std:.2f}"


def summarise(records: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """(attack, defense) -> ASR/CA/PA values over seeds and mean costs."""
    cells: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(list))
    for record in records:
        cell = cells[(record["attack"], record["defense"])]
        cell["seeds"].append(record["seed"])
        for metric in METRICS:
            cell[metric].append(record[metric]["value"])
        for cost in ("defense_seconds", "peak_memory_mb", "trainable_parameters"):
            cell[cost].append(record[cost])
    return {key: dict(value) for key, value in cells.items()}


def markdown_table(records: Sequence[dict], settings: dict | None = None) -> str:
    """Rows = attacks, columns = defenses, cells "ASR (CA)" in %, mean ± std over seeds."""
    settings = settings or {}
    cells = summarise(records)
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    defenses = list(dict.fromkeys(r["defense"] for r in records))
    images = sorted({r["test_images"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "# clipguard benchmark",
        "",
        f"ASR (CA) in %, zero-shot on the Fashion-MNIST test split ({', '.join(map(str, images))} images), "
        f"seeds {', '.join(map(str, seeds))}; mean ± std where a cell has several seeds. "
        f"{TARGET_EXCLUSION_NOTE}",
        "",
        "| attack | " + " | ".join(defenses) + " |",
        "|---|" + "---|" * len(defenses),
    ]
    for attack in attacks:
        row = []
        for defense in defenses:
            cell = cells.get((attack, defense))
            broken = any(r.get("warning") for r in records if (r["attack"], r["defense"]) == (attack, defense))
            row.append("—" if cell is None else
                       f"{_percent(cell['attack_success_rate'])} ({_percent(cell['clean_accuracy'])})"
                       + ("" if len(cell["seeds"]) < 2 else f" n={len(cell['seeds'])}") + (" ⚠" if broken else ""))
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    warnings = [f"- ⚠ {r['attack']} / {r['defense']} / seed {r['seed']}: {r['warning']}" for r in records
                if r.get("warning")]
    if warnings:
        lines += ["", "**Warnings**", "", *warnings]
    lines += ["", "## Cost per defense (mean over cells)", "",
              "| defense | cells | defense time (s) | trainable parameters | peak memory (MB) |", "|---|---|---|---|---|"]
    for defense in defenses:
        chosen = [r for r in records if r["defense"] == defense]
        seconds = mean_std([r["defense_seconds"] for r in chosen])[0]
        params = mean_std([r["trainable_parameters"] for r in chosen])[0]
        memory = max(r["peak_memory_mb"] for r in chosen)
        lines.append(f"| {defense} | {len(chosen)} | {seconds:.1f} | {params:,.0f} | {memory:.0f} |")
    kinds = sorted({r.get("peak_memory_kind", "") for r in records} - {""})
    if kinds:
        lines += ["", f"Peak memory: {'; '.join(kinds)}."]
    if settings:
        lines += ["", "Settings: `" + json.dumps(settings, sort_keys=True, default=str) + "`"]
    return "\n".join(lines) + "\n"


def plot_asr_ca(records: Sequence[dict], path: str | Path) -> None:
    """Two panels (ASR, CA): grouped bars, one group per attack, one bar per defense (mean, std whiskers)."""
    from matplotlib import pyplot as plt

    from clipguard.eval.plots import save_figure

    cells = summarise(records)
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    defenses = list(dict.fromkeys(r["defense"] for r in records))
    width = 0.8 / len(defenses)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(attacks) * max(1, len(defenses)) / 3), 6), sharex=True)
    for ax, metric, title in zip(axes, ("attack_success_rate", "clean_accuracy"), ("ASR (%)", "CA (%)")):
        for i, defense in enumerate(defenses):
            stats = [mean_std([100 * v for v in cells[(a, defense)][metric]]) if (a, defense) in cells else (math.nan, 0)
                     for a in attacks]
            xs = [k + (i - (len(defenses) - 1) / 2) * width for k in range(len(attacks))]
            ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=defense, capsize=2)
        ax.set_ylabel(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(range(len(attacks)))
    axes[1].set_xticklabels(attacks, rotation=30, ha="right")
    axes[0].set_title("target-class images excluded from ASR", fontsize=8)
    save_figure(fig, path)


def _markdown_to_html(text: str) -> str:
    """Just enough Markdown for the results file: headings, tables, paragraphs, code."""
    out, table = [], []

    def flush():
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-")]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    return "\n".join(out)


def write_html(markdown: str, images: Sequence[str], path: str | Path) -> None:
    """One page: the tables and every figure (linked by relative path, so the folder moves as one)."""
    figures = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}">'
                        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name in images)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>clipguard benchmark</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
            "th:first-child,td:first-child{text-align:left}img{max-width:100%}</style></head><body>"
            f"{_markdown_to_html(markdown)}\n{figures}</body></html>\n")
    _write_text(path, page)


def _write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(records: Sequence[dict], out: str | Path, settings: dict | None = None,
                 extra_images: Sequence[str] = ()) -> dict[str, str]:
    """Write results.json, results.md, asr_ca.png and report.html under ``out``; returns their paths."""
    from clipguard.eval.evaluate import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: (r["attack"], r["seed"]))
    write_json({"settings": settings or {}, "note": TARGET_EXCLUSION_NOTE, "cells": list(records)}, out / RESULTS_JSON)
    markdown = markdown_table(records, settings)
    _write_text(out / RESULTS_MD, markdown)
    plot_asr_ca(records, out / BARS_PNG)
    images = [BARS_PNG, *[name for name in extra_images if (out / name).is_file()]]
    write_html(markdown, images, out / REPORT_HTML)
    return {"json": str(out / RESULTS_JSON), "markdown": str(out / RESULTS_MD), "html": str(out / REPORT_HTML)}
