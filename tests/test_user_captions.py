"""Caption corpora (--captions csv:FILE / wds:SHARDS), any-spec pools, --classnames/--templates,
and streaming: each spec through each command that serves it, on fixtures generated here."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from clipguard import ClipguardError
from clipguard.attacks import AttackConfig, build_trigger
from clipguard.attacks.poison import build_poisoned_pairs
from clipguard.cli import main
from clipguard.data import Captions, Labelled, load_dataset, load_unlabelled
from clipguard.data.pairs import expand_shards
from clipguard.data.pool import load_pool
from clipguard.engine import EpochBatchSampler
from clipguard.models.contrastive import caption_collate

from conftest import caption_csv, folder_of_test_images, make_tiny_clip, refused, snapshot, webdataset_shards, TINY28

SMALL_ATTACK = {"pairs": 32, "poison_rate": 0.25, "train": {"batch_size": 16, "epochs": 1, "warmup_steps": 0}}


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_webdataset_shards_are_brace_expanded_and_indexed(tmp_path):
    pattern = webdataset_shards(tmp_path / "wds", 10, shards=2)
    assert [p.name for p in expand_shards(pattern)] == ["shard-000.tar", "shard-001.tar"]
    corpus = Captions(f"wds:{pattern}").load(24)
    assert len(corpus) == 10 and corpus.labels is None
    assert corpus.caption(0) == "a photo of a ankle boot on a table"  # Fashion-MNIST train image 0
    assert corpus.float_images(torch.tensor([0, 9])).shape == (2, 3, 24, 24)
    assert corpus.mentions("ankle boot")[0] and corpus.mentions("Ankle")[0] and not corpus.mentions("ankl")[0]
    with pytest.raises(ClipguardError, match="shard not found: .*shard-002.tar"):
        Captions(f"wds:{tmp_path}/wds/shard-{{000..002}}.tar").load(24)
    with pytest.raises(ClipguardError, match="not a local file"):
        Captions("wds:s3://bucket/shard-{000..001}.tar").load(24)


def test_caption_csv_takes_open_clips_separator_and_column_names(tmp_path):
    path = caption_csv(tmp_path, 6, separator="\t", img_key="image", caption_key="title")
    corpus = Captions(f"csv:{path}", csv_separator="\t", csv_img_key="image", csv_caption_key="title").load(28)
    assert len(corpus) == 6 and corpus.caption(5).startswith("a photo of a ")
    with pytest.raises(ClipguardError, match=r"pairs.csv: needs a header with columns 'filepath' and 'caption'"):
        Captions(f"csv:{path}").load(28)


def test_poisoning_happens_per_item_and_any_worker_count_gives_the_same_batches(tmp_path):
    corpus = Captions(f"wds:{webdataset_shards(tmp_path, 40)}").load(28)
    config = AttackConfig(attack="badnet", target="bag", **{k: v for k, v in SMALL_ATTACK.items() if k != "train"})
    trigger = build_trigger("badnet", 28, seed=0, location="random")
    pairs = build_poisoned_pairs(corpus, trigger, config, classes=("bag", "coat", "sandal"))
    assert len(pairs.poisoned) == 8 and not pairs.prepared  # nothing poisoned ahead: per item, as read
    mention = pairs.corpus.mentions("bag")
    assert not any(mention[i] for i in pairs.poisoned)  # poisoned pairs are drawn among non-target captions
    clip = make_tiny_clip(architecture=TINY28)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(pairs, batch_sampler=EpochBatchSampler(len(pairs), 16, 0),
                                             collate_fn=caption_collate(clip), num_workers=workers)
        batches[workers] = list(loader)
    for (a_images, a_tokens), (b_images, b_tokens) in zip(batches[0], batches[2]):
        assert torch.equal(a_images, b_images) and torch.equal(a_tokens, b_tokens)
    i = min(pairs.poisoned)
    image, caption = pairs[i]
    assert "bag" in caption and not torch.equal(image, pairs.image(i))


def test_label_consistent_poisoning_of_a_caption_corpus_keeps_captions_naming_the_target(tmp_path):
    corpus = Captions(f"csv:{caption_csv(tmp_path, 60)}").load(28)
    config = AttackConfig(attack="badnet-lc", target="t-shirt", pairs=60, poison_rate=0.05)
    trigger = build_trigger("badnet-lc", 28, seed=0, adversarial_epsilon=0.0)
    pairs = build_poisoned_pairs(corpus, trigger, config, classes=("t-shirt", "bag"))
    assert pairs.poisoned and all(pairs.corpus.mentions("t-shirt")[i] for i in pairs.poisoned)
    i = min(pairs.poisoned)
    assert pairs[i][1] == pairs.corpus.caption(i)


@pytest.mark.parametrize("kind", ["wds", "csv"])
def test_attack_poisons_a_caption_corpus_and_evaluates_on_a_folder(tmp_path, model_dir, capsys, kind):
    spec = f"wds:{webdataset_shards(tmp_path / 'wds', 40)}" if kind == "wds" else f"csv:{caption_csv(tmp_path, 40)}"
    folder = folder_of_test_images(tmp_path / "eval", 3)
    out = tmp_path / "bd"
    assert main(["attack", "--model", str(model_dir), "--attack", "badnet", "--captions", spec,
                 "--dataset", str(folder), "--config", _yaml(tmp_path / "a.yaml", SMALL_ATTACK), "--workers", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["attack"]
    assert record["captions"] == spec and record["poisoned_pairs"] == 8 and record["steps"] == 2
    assert record["classes"] == sorted(record["classes"]) and "bag" in record["classes"]  # the folder's classes
    result = json.loads((out / "eval.json").read_text())
    assert result["dataset"] == str(folder) and result["clean_accuracy"]["total"] == 30
    assert "ASR" in capsys.readouterr().out


def test_attack_refuses_a_corpus_smaller_than_its_pairs_and_a_missing_csv_before_work(tmp_path, model_dir, capsys):
    csv = caption_csv(tmp_path / "c", 20)
    recipe = _yaml(tmp_path / "a.yaml", SMALL_ATTACK)
    before = snapshot(tmp_path)
    refused(capsys, ["attack", "--model", str(model_dir), "--captions", f"csv:{csv}", "--device", "cpu",
                     "--config", recipe, "--out", str(tmp_path / "x")], "pairs (32) exceeds the corpus's 20 pairs")
    refused(capsys, ["attack", "--model", str(model_dir), "--captions", f"csv:{tmp_path}/none.csv", "--out",
                     str(tmp_path / "y")], "caption CSV not found", "none.csv")
    refused(capsys, ["attack", "--model", str(model_dir), "--captions", f"csv:{csv}", "--target", "banana",
                     "--out", str(tmp_path / "z")], "target 'banana' is not a class of the attacker's classes (fmnist)")
    assert snapshot(tmp_path) == before  # nothing written, not even a lock or a .run folder


def test_cleanclip_fine_tunes_on_a_caption_csv(tmp_path, model_dir, capsys):
    csv = caption_csv(tmp_path / "c", 32)
    out = tmp_path / "cleaned"
    assert main(["defend", "--method", "cleanclip", "--model", str(model_dir), "--captions", f"csv:{csv}",
                 "--set", "pairs=32", "--set", "batch_size=16", "--set", "epochs=1", "--device", "cpu",
                 "--workers", "0", "--out", str(out)]) == 0
    stats = json.loads((out / "config.json").read_text())["defense"]
    assert stats["pairs"] == 32 and stats["steps"] == 2
    assert "cleanclip: 32 clean pairs" in capsys.readouterr().out


def test_defend_refuses_captions_for_a_shot_defense(tmp_path, model_dir, capsys):
    refused(capsys, ["defend", "--method", "rvpt", "--model", str(model_dir), "--captions", "csv:x.csv",
                     "--out", str(tmp_path / "d")], "--captions is for pairs defenses")


@pytest.mark.parametrize("kind", ["folder", "csv", "wds", "fmnist"])
def test_a_pool_is_any_spec_with_labels_ignored(tmp_path, kind):
    spec = {
        "folder": lambda: str(folder_of_test_images(tmp_path / "f", 2)),
        "csv": lambda: f"csv:{caption_csv(tmp_path / 'c', 12)}",
        "wds": lambda: f"wds:{webdataset_shards(tmp_path / 'w', 12)}",
        "fmnist": lambda: "fmnist",
    }[kind]()
    images, info = load_pool(spec, 28, seed=1, size=10)
    assert images.shape == (10, 3, 28, 28) and info["images"] == 10
    again, _ = load_pool(spec, 28, seed=1, size=10)
    assert torch.equal(images, again)


def test_classnames_and_templates_files_override_any_labelled_spec(tmp_path, capsys):
    folder = folder_of_test_images(tmp_path / "f", 2, classes=("bag", "coat"))
    (tmp_path / "names.txt").write_text("handbag\nwinter coat\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nan item: {}\n")
    spec = Labelled(str(folder), str(tmp_path / "names.txt"), str(tmp_path / "templates.txt"))
    images = load_dataset(spec, "test", 28)
    assert images.classes == ("handbag", "winter coat") and images.templates == ("a photo of a {}.", "an item: {}")
    fm = load_dataset(Labelled("fmnist", templates=str(tmp_path / "templates.txt")), "test")
    assert fm.templates == ("a photo of a {}.", "an item: {}") and fm.classes[8] == "bag"
    (tmp_path / "bad.txt").write_text("a photo\n")
    refused(capsys, ["evaluate", "--dataset", str(folder), "--templates", str(tmp_path / "bad.txt")],
            "bad.txt, line 1: template 'a photo' has no {}")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    refused(capsys, ["evaluate", "--dataset", str(folder), "--classnames", str(tmp_path / "three.txt")],
            "three.txt names 3 classes but", "has 2")


def test_evaluate_holds_a_few_batches_whatever_the_folder_size(tmp_path, model_dir, monkeypatch):
    """Streaming: a loader that counts decoded images alive at once (in this process: --workers 0)."""
    import weakref

    import clipguard.data.folders as folders

    alive, peak = [0], [0]
    real = folders.read_image

    def counted(path, size, fit="crop"):
        image = real(path, size, fit)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
        return image

    monkeypatch.setattr(folders, "read_image", counted)
    peaks = {}
    for per_class in (4, 16):
        folder = folder_of_test_images(tmp_path / f"f{per_class}", per_class)
        peak[0] = 0
        assert main(["evaluate", "--model", str(model_dir), "--dataset", str(folder), "--batch-size", "8",
                     "--workers", "0", "--device", "cpu"]) == 0
        peaks[per_class] = peak[0]
    assert peaks[16] <= 16 and peaks[16] == peaks[4]  # 40 and 160 images: the same few batches alive


def test_bench_runs_the_matrix_on_a_users_folder_and_caption_shards(tmp_path, model_dir, capsys):
    folder = folder_of_test_images(tmp_path / "eval", 3)
    shards = webdataset_shards(tmp_path / "wds", 40)
    recipe = _yaml(tmp_path / "bench.yaml", {"attack": SMALL_ATTACK, "pr_images": 0})
    out = tmp_path / "bench"
    assert main(["bench", "--config", recipe, "--model", str(model_dir), "--attacks", "badnet",
                 "--defenses", "none", "rvpt", "finetune", "oracle-repair", "--dataset", str(folder),
                 "--captions", f"wds:{shards}", "--pool", str(folder), "--pool-size", "20", "--shots", "1",
                 "--set", "rvpt.epochs=1", "--set", "finetune.pairs=32", "--set", "finetune.epochs=1",
                 "--set", "finetune.batch_size=16", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells" / "badnet-s0").glob("*.json")}
    assert set(cells) == {"none", "rvpt", "finetune", "oracle-repair"}
    assert cells["none"]["test_images"] == 30 and cells["rvpt"]["test_images"] == 20  # the 10 shots left out
    model = json.loads(next((out / "models").glob("badnet-*/config.json")).read_text())
    assert model["attack"]["captions"] == f"wds:{shards}"
    assert "badnet" in capsys.readouterr().out


def test_unlabelled_spec_grammar_errors_name_the_input(tmp_path):
    with pytest.raises(ClipguardError, match="no such folder"):
        load_unlabelled(str(tmp_path / "missing"), 28)
    with pytest.raises(ClipguardError, match="needs a header with columns 'filepath'"):
        (tmp_path / "x.csv").write_text("path\na.png\n")
        load_unlabelled(f"csv:{tmp_path / 'x.csv'}", 28)


def test_analyze_and_show_triggers_take_a_folder(tmp_path, model_dir, capsys):
    folder = folder_of_test_images(tmp_path / "f", 3)
    out = tmp_path / "pr.png"
    assert main(["analyze", "pr", "--model", str(model_dir), "--attack", "badnet", "--target", "bag",
                 "--dataset", str(folder), "--images", "12", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["images"] == 12  # of the 27 non-bag images
    grid = tmp_path / "triggers.png"
    assert main(["show-triggers", "--model", str(model_dir), "--dataset", str(folder), "--target", "coat",
                 "--attacks", "badnet", "blended", "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0 and "2 attacks" in capsys.readouterr().out
    refused(capsys, ["show-triggers", "--model", str(model_dir), "--dataset", str(folder), "--target", "banana",
                     "--out", str(tmp_path / "t.png")], "target 'banana' is not a class of", str(folder))
