"""The benchmark's report: results.json, a paper-style results.md, bar plots and report.html.

The content (definitions, tables, verdicts, settings) comes from :mod:`clipguard.eval.tables`
as a list of blocks (:func:`~clipguard.eval.tables.report_blocks`); this module renders it twice:
as Markdown (:func:`render_markdown`, results.md) and as HTML (:func:`write_html`).

Example::

    write_report(records, "runs/bench", {"limit": None, "seeds": [0], "title": "clipguard demo"})
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

from clipguard.eval.metrics import TARGET_EXCLUSION_NOTE
from clipguard.eval.tables import (
    DEFAULT_TITLE, attack_defense_order, mean_std, report_blocks, report_title, summarise,
)
from clipguard.outputs import atomic_write_text

RESULTS_JSON, RESULTS_MD, BARS_PNG, REPORT_HTML = "results.json", "results.md", "asr_ca.png", "report.html"
CAPTIONS = {
    BARS_PNG: "ASR and CA per attack (groups) and defense (bars), in %; whiskers: ± std where a cell has "
              "several seeds",
    "triggers.png": "Each attack's trigger on one test image; bottom row: |triggered - clean|, scaled to each "
                    "panel's maximum (given above the panel)",
}


# ------------------------------------------------------------------------ rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(blocks: Sequence[tuple]) -> str:
    parts = []
    for kind, *body in blocks:
        if kind == "h1":
            parts.append(f"# {body[0]}")
        elif kind == "h2":
            parts.append(f"## {body[0]}")
        elif kind == "strong":
            parts.append(f"**{body[0]}**")
        elif kind == "p":
            parts.append(body[0])
        elif kind == "list":
            lines = []
            for item in body[0]:
                if isinstance(item, tuple):
                    lines += [f"- {item[0]}:", *[f"  - {sub}" for sub in item[1]]]
                else:
                    lines.append(f"- {item}")
            parts.append("\n".join(lines))
        elif kind == "table":
            header, rows = body
            parts.append("\n".join(["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header),
                                    *["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]]))
    return "\n\n".join(parts) + "\n"


def render_html(blocks: Sequence[tuple]) -> str:
    esc = html.escape
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(body[0])}</{kind}>")
        elif kind == "strong":
            out.append(f"<p><strong>{esc(body[0])}</strong></p>")
        elif kind == "list":
            items = [f"<li>{esc(item[0])}:<ul>" + "".join(f"<li>{esc(s)}</li>" for s in item[1]) + "</ul></li>"
                     if isinstance(item, tuple) else f"<li>{esc(item)}</li>" for item in body[0]]
            out.append("<ul>" + "".join(items) + "</ul>")
        elif kind == "table":
            header, rows = body
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
    return "\n".join(out)


def markdown_table(records: Sequence[dict], settings: dict | None = None) -> str:
    """results.md: the title, the metric definitions, "ASR (CA)" (rows = attacks, columns = defenses,
    in %, mean ± std over seeds), PA with the counts, the verdicts, the costs and the settings."""
    return render_markdown(report_blocks(records, settings))


def plot_asr_ca(records: Sequence[dict], path: str | Path, title: str = DEFAULT_TITLE):
    """Two panels (ASR, CA): grouped bars, one group per attack, one bar per defense, each with its mean
    written on it; ± std whiskers only on cells with several seeds. Returns the (closed) figure."""
    from matplotlib import pyplot as plt

    from clipguard.eval.plots import save_figure

    cells = summarise(records)
    attacks, defenses = attack_defense_order(records)
    width = 0.8 / len(defenses)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(attacks) * max(1, len(defenses)) / 3), 6.4), sharex=True)
    several = False
    panels = (("attack_success_rate", "ASR (%)", "ASR: triggered non-target images put in the target class "
                                                 "(target-class images excluded); lower is better"),
              ("clean_accuracy", "CA (%)", "CA: zero-shot accuracy on the clean evaluation images; higher is better"))
    for ax, (metric, ylabel, subtitle) in zip(axes, panels):
        for i, defense in enumerate(defenses):
            xs = [k + (i - (len(defenses) - 1) / 2) * width for k in range(len(attacks))]
            values = [[100 * v for v in cells[(a, defense)][metric]] if (a, defense) in cells else [] for a in attacks]
            means = [mean_std(v)[0] if v else math.nan for v in values]
            ax.bar(xs, means, width, label=defense)
            spread = [(x, m, mean_std(v)[1]) for x, m, v in zip(xs, means, values) if len(v) > 1]
            tops = {x: m + s for x, m, s in spread}
            for x, m in zip(xs, means):
                if not math.isnan(m):  # the mean, above the bar and its whisker
                    ax.annotate(f"{m:.1f}", (x, tops.get(x, m)), xytext=(0, 1.5), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6, rotation=90 if len(defenses) > 4 else 0)
            if spread:
                several = True
                ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=[s for _, _, s in spread],
                            fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 112)  # room for the numbers above a 100 % bar
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(subtitle, fontsize=8)
    axes[0].legend(title="defense", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(range(len(attacks)))
    axes[1].set_xticklabels(attacks, rotation=30, ha="right")
    axes[1].set_xlabel("attack")
    fig.suptitle(f"{title}: ASR and CA per attack and defense"
                 + ("\nbars: mean over seeds; whiskers: ± std (cells with several seeds)" if several else ""),
                 fontsize=10)
    save_figure(fig, path)
    return fig


def _markdown_to_html(text: str) -> str:
    """Just enough Markdown for a results file given as text: headings, tables, lists, paragraphs."""
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


def write_html(report: Sequence[tuple] | str, images: Sequence[str], path: str | Path,
               title: str | None = None) -> None:
    """One page: the report (blocks from :func:`report_blocks`, or Markdown text) and every figure
    (linked by relative path, so the folder moves as one). ``title``: the page's <title>, by default
    the report's first heading."""
    if isinstance(report, str):
        body = _markdown_to_html(report)
        heading = next((line[2:] for line in report.splitlines() if line.startswith("# ")), DEFAULT_TITLE)
    else:
        body = render_html(report)
        heading = next((b[1] for b in report if b[0] == "h1"), DEFAULT_TITLE)
    figures = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}">'
                        f"<figcaption>{html.escape(CAPTIONS.get(name, name))} ({html.escape(name)})</figcaption>"
                        f"</figure>" for name in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or heading)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
            "th:first-child,td:first-child{text-align:left}img{max-width:100%}figcaption{font-size:13px}"
            "</style></head><body>"
            f"{body}\n{figures}</body></html>\n")
    atomic_write_text(path, page)


def write_report(records: Sequence[dict], out: str | Path, settings: dict | None = None,
                 extra_images: Sequence[str] = ()) -> dict[str, str]:
    """Write results.json, results.md, asr_ca.png and report.html under ``out``; returns their paths.

    ``settings`` (shown in the report) may hold a ``title`` (default "clipguard benchmark")."""
    from clipguard.eval.evaluate import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: (r["attack"], r["seed"]))
    write_json({"settings": settings or {}, "note": TARGET_EXCLUSION_NOTE, "cells": list(records)}, out / RESULTS_JSON)
    blocks = report_blocks(records, settings)
    atomic_write_text(out / RESULTS_MD, render_markdown(blocks))
    plot_asr_ca(records, out / BARS_PNG, title=report_title(settings))
    images = [BARS_PNG, *[name for name in extra_images if (out / name).is_file()]]
    write_html(blocks, images, out / REPORT_HTML)
    return {"json": str(out / RESULTS_JSON), "markdown": str(out / RESULTS_MD), "html": str(out / REPORT_HTML)}
