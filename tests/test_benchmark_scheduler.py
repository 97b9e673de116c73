"""benchmarks/defender_data.py schedules `clipguard` processes under a deadline: what finished is
kept, what was still running is stopped and reported with the last line it printed."""

import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "defender_data.py"


@pytest.fixture(scope="module")
def defender_data():
    sys.path.insert(0, str(BENCHMARK.parent))  # as `python benchmarks/defender_data.py` sees its _tables
    spec = importlib.util.spec_from_file_location("defender_data", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_deadline_stops_what_runs_and_keeps_what_finished(defender_data, tmp_path):
    quick_done, slow_done = tmp_path / "quick.done", tmp_path / "slow.done"
    tasks = [
        ("quick", python(f"open({str(quick_done)!r}, 'w'); print('fit: 100%|##########| 5/5\\rall done')"),
         tmp_path / "logs" / "quick.log", tmp_path / "never-there"),
        ("slow", python("import time; print('fit:  10%|#  | 1/10', flush=True); time.sleep(60)"),
         tmp_path / "logs" / "slow.log", slow_done),
        ("queued", python("print('never runs')"), tmp_path / "logs" / "queued.log", tmp_path / "never-either"),
    ]
    status = defender_data.run_all(tasks, parallel=1, stop_at=time.monotonic() + 4, env=None)

    assert status["quick"]["returncode"] == 0 and quick_done.is_file()
    assert status["quick"]["seconds"] < 4
    # one at a time: the slow one ran from the quick one's end to the deadline and says how far it
    # got; the queued one never started
    assert status["slow"]["unfinished"] == "fit:  10%|#  | 1/10"
    assert 1 <= status["slow"]["seconds"] < 10
    assert status["queued"] == {"unfinished": "not started"}
    assert not (tmp_path / "logs" / "queued.log").exists()


def test_a_task_whose_result_is_there_is_not_run_again(defender_data, tmp_path):
    done = tmp_path / "eval.json"
    done.write_text("{}")
    marker = tmp_path / "ran"
    tasks = [("cached", python(f"open({str(marker)!r}, 'w')"), tmp_path / "cached.log", done)]
    status = defender_data.run_all(tasks, parallel=1, stop_at=float("inf"), env=None)
    assert status["cached"]["reused"] and not marker.exists()


def test_the_table_names_unfinished_and_failed_jobs(defender_data):
    summary = {"attacks": {"badnet": {
        "none": {"asr": 80.96, "asr_counts": "3631/4485", "ca": 89.88, "ca_counts": "4494/5000", "process_seconds": 30},
        "rvpt-1600-e50": {"unfinished": "unfinished: rvpt:  40%|####  | 10000/25000", "process_seconds": 470},
        "cbpt-1600": {"error": "exit 2", "process_seconds": 3},
    }}}
    lines = defender_data.table(summary).splitlines()
    assert lines[2] == "| badnet | none | 80.96 (3631/4485) | 89.88 (4494/5000) |  |  | 30 |"
    assert "10000/25000" in lines[3] and lines[4].startswith("| badnet | cbpt-1600 | exit 2 |")
    # the progress bar's own "|" are escaped: the unfinished row keeps the header's columns
    assert [len(re.split(r"(?<!\\)\|", line)) for line in lines[3:5]] == [len(lines[0].split("|"))] * 2
