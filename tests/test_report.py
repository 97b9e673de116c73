"""The bench report: title, metric definitions, counts summed over seeds, verdicts, settings, figures, HTML."""

from matplotlib.container import ErrorbarContainer

from clipguard.eval import tables
from clipguard.eval.report import markdown_table, plot_asr_ca, write_report
from clipguard.eval.tables import LOWERS, NO_EFFECT, REMOVES, counts_table, settings_items, verdict, verdict_table

CPU_KIND = "process peak RSS so far (CPU)"


def record(attack, defense, seed, ca, asr, pa, total=200, non_target=180, **extra):
    """A cell record as bench.run_cell writes it; ca, asr, pa are integer counts."""
    return {
        "attack": attack, "defense": defense, "seed": seed, "key": "k",
        "clean_accuracy": {"value": ca / total, "correct": ca, "total": total},
        "attack_success_rate": {"value": asr / non_target, "hits": asr, "total": non_target},
        "poisoned_accuracy": {"value": pa / non_target, "correct": pa, "total": non_target},
        "target": "bag", "test_images": total, "defense_seconds": 1.5, "eval_seconds": 2.0, "wall_seconds": 3.5,
        "peak_memory_mb": 2364.0, "peak_memory_kind": CPU_KIND, "trainable_parameters": 0 if defense == "none" else 512,
        "settings": {}, "stats": {}, "clipguard_version": "0.1.0", **extra,
    }


# badnet: seed 0 only. none: ASR 180/180 = 100 %, CA 180/200 = 90 %.
#   rvpt  ASR 9/180 = 5 %, CA 178/200 = 89 % (cost 1 point)      -> removes the backdoor
#   cbpt  ASR 90/180 = 50 %, CA 180/200                          -> lowers ASR (drop 50 points)
# badclip: seeds 0 and 1 (counts summed in the counts table).
#   none  ASR 171+162 / 360 (95 %, 90 %), CA 90 %
#   rvpt  ASR 162+153 / 360 (90 %, 85 %): drop 5 points          -> no effect
#   cbpt  ASR 9 / 180 each (5 %) but CA 160/200 (cost 10 points) -> lowers ASR, not "removes"
RECORDS = [
    record("badnet", "none", 0, ca=180, asr=180, pa=0),
    record("badnet", "rvpt", 0, ca=178, asr=9, pa=150),
    record("badnet", "cbpt", 0, ca=180, asr=90, pa=80),
    *[record("badclip", "none", s, ca=180, asr=asr, pa=5) for s, asr in ((0, 171), (1, 162))],
    *[record("badclip", "rvpt", s, ca=180, asr=asr, pa=10 + s) for s, asr in ((0, 162), (1, 153))],
    *[record("badclip", "cbpt", s, ca=160, asr=9, pa=120) for s in (0, 1)],
]
SETTINGS = {"model": "builtin", "attacks": ["badnet", "badclip"], "defenses": ["none", "rvpt", "cbpt"],
            "seeds": [0, 1], "limit": None,
            "attack": {"attack": "badnet", "target": "bag", "poison_rate": 0.15, "seed": 0,
                       "train": {"epochs": 10, "seed": 0, "lr": 0.0001}},
            "trigger_settings": {"badclip": {"steps": 100}}, "defense_settings": {},
            "pool": "fmnist-train:2000 <mine>"}


def test_title_comes_from_the_settings():
    assert markdown_table(RECORDS, SETTINGS).startswith("# clipguard benchmark\n")
    table = markdown_table(RECORDS, {**SETTINGS, "title": "clipguard demo"})
    assert table.startswith("# clipguard demo\n")
    assert "title:" not in table  # the title is not listed among the settings


def test_first_table_keeps_its_format_and_metrics_are_defined_once():
    table = markdown_table(RECORDS, SETTINGS)
    assert "| attack | none | rvpt | cbpt |\n|---|---|---|---|" in table
    assert "| badnet | 100.00 (90.00) | 5.00 (89.00) | 50.00 (90.00) |" in table
    assert "| badclip | 92.50±3.54 (90.00±0.00) n=2 |" in table
    for name in ("CA (clean accuracy)", "ASR (attack success rate)", "PA (poisoned accuracy)"):
        assert table.count(name) == 1
    assert "target-class images are excluded" in table and "200 images of the Fashion-MNIST test split" in table


def test_the_metrics_name_the_images_of_the_dataset_scored():
    val = markdown_table(RECORDS, {**SETTINGS, "dataset": "fmnist-val"})
    assert "200 images of Fashion-MNIST train[55000:], the validation split" in val and "test split" not in val
    folder = markdown_table(RECORDS, {**SETTINGS, "dataset": "imagenet:/data/imagenet"})
    assert "200 images of imagenet:/data/imagenet (its evaluation split)" in folder and "Fashion-MNIST" not in folder


def test_counts_table_sums_counts_over_seeds():
    header, rows = counts_table(RECORDS)
    assert header[:3] == ["attack", "defense", "seeds"]
    by_cell = {(r[0], r[1]): r for r in rows}
    assert by_cell[("badnet", "rvpt")][2:] == ["0", "83.33", "178/200", "9/180", "150/180"]
    assert by_cell[("badclip", "none")][2:] == ["0, 1", "2.78±0.00", "360/400", "333/360", "10/360"]
    assert by_cell[("badclip", "rvpt")][6] == "21/360"  # PA 10 + 11
    assert "counts are summed" in markdown_table(RECORDS)


def test_verdicts_for_hand_picked_numbers():
    rows = {(r[0], r[1]): r for r in verdict_table(RECORDS)[1]}
    assert set(rows) == {(d, a) for d in ("rvpt", "cbpt") for a in ("badnet", "badclip")}  # no "none" rows
    assert rows[("rvpt", "badnet")][2:] == ["100.00 → 5.00", "95.00", "90.00 → 89.00", "1.00", REMOVES]
    assert rows[("cbpt", "badnet")][-1] == LOWERS
    assert rows[("rvpt", "badclip")][3] == "5.00" and rows[("rvpt", "badclip")][-1] == NO_EFFECT
    assert rows[("cbpt", "badclip")][-1] == LOWERS  # ASR 5 % but CA cost 10 points: not "removes"
    # the thresholds, at their edges
    assert verdict(90, tables.REMOVED_ASR, 90, 90 - tables.REMOVED_CA_COST) == REMOVES
    assert verdict(90, 10.01, 90, 90) == LOWERS
    assert verdict(90, 90 - tables.LOWERED_ASR_DROP + 0.01, 90, 90) == NO_EFFECT
    assert verdict(8, 1, 90, 90) == tables.NO_BACKDOOR
    assert verdict(100, 0, 90, 10, broken=True) == tables.BROKEN
    table = markdown_table(RECORDS)
    assert "| defense | attack | ASR % none → defended |" in table
    assert f"≤ {tables.REMOVED_ASR:g}%" in table and f"≥ {tables.LOWERED_ASR_DROP:g} points" in table


def test_no_verdict_without_a_none_cell():
    table = markdown_table([r for r in RECORDS if r["defense"] != "none"])
    assert "| defense | attack | ASR" not in table and 'No "none" cell' in table


def test_warnings_are_kept_and_mark_the_verdict():
    broken = [*RECORDS[:2], record("badnet", "cbpt", 0, ca=20, asr=0, pa=18, warning="CA 10.0% is at chance")]
    table = markdown_table(broken)
    assert "**Warnings**\n\n- ⚠ badnet / cbpt / seed 0: CA 10.0% is at chance" in table
    assert "| badnet | 100.00 (90.00) | 5.00 (89.00) | 0.00 (10.00) ⚠ |" in table
    assert {r[0]: r[-1] for r in verdict_table(broken)[1]}["cbpt"] == tables.BROKEN


def test_settings_are_a_list_without_the_default_attack_name():
    items = settings_items(SETTINGS)
    assert "attacks: badnet, badclip" in items and "seeds: 0, 1" in items
    assert "trigger_settings.badclip.steps: 100" in items and "defense_settings: none" in items
    (label, shared), = [item for item in items if isinstance(item, tuple)]
    assert label.startswith("attack settings (for every attack row; the attack name is the row")
    assert shared == ["target: bag", "poison_rate: 0.15", "train.epochs: 10", "train.lr: 0.0001"]
    table = markdown_table(RECORDS, SETTINGS)
    assert "attack: badnet" not in table and "{" not in table.split("## Settings")[1]
    assert "  - poison_rate: 0.15" in table


def test_peak_memory_is_labelled_by_kind():
    table = markdown_table(RECORDS)
    assert f"peak memory (MB), {CPU_KIND} |" in table and "| 2,364 |" in table
    assert tables.CPU_MEMORY_NOTE in table
    assert "whole process's peak resident memory so far" in tables.CPU_MEMORY_NOTE


def _errorbars(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_bars_have_numbers_labels_and_error_bars_only_for_several_seeds(tmp_path):
    fig = plot_asr_ca(RECORDS, tmp_path / "bars.png", title="clipguard demo")
    assert (tmp_path / "bars.png").stat().st_size > 0
    asr, ca = fig.axes[:2]
    assert "clipguard demo" in fig._suptitle.get_text()
    assert asr.get_ylabel() == "ASR (%)" and ca.get_ylabel() == "CA (%)" and ca.get_xlabel() == "attack"
    texts = [t.get_text() for t in asr.texts]
    assert "100.0" in texts and "5.0" in texts and "92.5" in texts
    # badnet (seed 0 only) and badclip (2 seeds): one whisker per defense, at badclip's bar only
    bars = {c.get_label(): c for c in asr.containers if not isinstance(c, ErrorbarContainer)}
    whiskers = _errorbars(asr)
    assert len(whiskers) == 3
    badclip = {round(bars[d].patches[1].get_x() + bars[d].patches[1].get_width() / 2, 6) for d in bars}
    whisker_xs = {round(float(segment[0][0]), 6) for w in whiskers for segment in w.lines[2][0].get_segments()}
    assert whisker_xs == badclip
    single = plot_asr_ca([r for r in RECORDS if r["seed"] == 0], tmp_path / "one.png")
    assert not any(_errorbars(ax) for ax in single.axes)


def test_trigger_grid_has_a_labelled_colour_bar(tmp_path):
    import torch

    from clipguard.eval.plots import DIFF_LABEL, plot_trigger_grid

    class Square:
        name, text_key = "square", None

        def __call__(self, images):
            images[..., :4, :4] = 1.0
            return images

    fig = plot_trigger_grid(torch.zeros(3, 28, 28), [Square(), Square()], tmp_path / "triggers.png")
    assert (tmp_path / "triggers.png").stat().st_size > 0
    labels = [inner.get_ylabel() for ax in fig.axes for inner in (ax, *ax.child_axes)]
    assert DIFF_LABEL in labels and "|triggered - clean|" in DIFF_LABEL


def test_html_has_every_piece_and_escapes_settings(tmp_path):
    paths = write_report(RECORDS, tmp_path, {**SETTINGS, "title": "clipguard demo"})
    page = (tmp_path / "report.html").read_text()
    assert "<title>clipguard demo</title>" in page and "<h1>clipguard demo</h1>" in page
    assert "fmnist-train:2000 &lt;mine&gt;" in page and "<mine>" not in page
    for piece in ("CA (clean accuracy)", "<th>CA correct/total</th>", "<td>360/400</td>", f"<td>{REMOVES}</td>",
                  "<li>trigger_settings.badclip.steps: 100</li>", 'src="asr_ca.png"'):
        assert piece in page
    assert page.count("<table>") == 4  # ASR (CA), counts, verdicts, cost
    markdown = (tmp_path / "results.md").read_text()
    assert markdown == markdown_table(sorted(RECORDS, key=lambda r: (r["attack"], r["seed"])),
                                      {**SETTINGS, "title": "clipguard demo"})
    assert set(paths) == {"json", "markdown", "html"}
