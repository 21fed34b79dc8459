"""evaluate.py --score ... --plot: the picture of two scored folders, and the per-task table on the terminal."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import evaluate as ev  # noqa: E402

from conftest import PREDICTIONS  # noqa: E402


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Qwen2-Audio's published predictions, and the same with each file's answers shuffled (a chance baseline)."""
    root = tmp_path_factory.mktemp("plot")
    qwen, shuffled = root / "Qwen2-Audio", root / "shuffled"
    shutil.copytree(PREDICTIONS / "Qwen2-Audio", qwen)
    for path in [qwen, *qwen.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shuffled.mkdir()
    rng = random.Random(0)
    for path in sorted(qwen.glob("*_test.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))
        answers = [row["answer"] for row in rows]
        rng.shuffle(answers)
        for row, answer in zip(rows, answers):
            row["answer"] = answer
        (shuffled / path.name).write_text(json.dumps(rows), encoding="utf-8")
    return qwen, shuffled


def test_plot_has_one_polygon_per_folder_and_every_task_axis(two_folders, tmp_path):
    pytest.importorskip("matplotlib")
    all_scores = ev.score_directories(list(two_folders))
    fig = ev.plot_scores(all_scores, tmp_path / "scores.png")
    radar = fig.axes[0]
    assert [line.get_label() for line in radar.get_lines()] == ["Qwen2-Audio", "shuffled"]
    assert len(radar.patches) == 2  # the filled polygons
    # one axis per task, open-ended QA once per modality configuration: 20 tasks - 1 + 3
    assert len(radar.get_xticks()) == len(all_scores[str(two_folders[0])]["tasks"]) + 2
    families = [ax.get_title(loc="left") for ax in fig.axes[1:]]
    assert families == [title for title, _ in ev.FAMILIES]
    png = (tmp_path / "scores.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000


def test_unit_scale_points_outward_for_better_models():
    better = {"primary": "wer", "kind": "asr", "wer": 0.1}
    worse = {"primary": "wer", "kind": "asr", "wer": 0.6}
    assert ev.unit_value([better]) == pytest.approx(0.9) and ev.unit_value([worse]) == pytest.approx(0.4)
    assert ev.unit_value([{"primary": "mae", "kind": "pitch", "mae": 6.0}]) == pytest.approx(0.75)
    assert ev.unit_value([{"primary": "judge_mean", "kind": "judge", "judge_mean": 5.0}]) == 1.0
    assert ev.unit_value([{"primary": "judge_mean", "kind": "judge"}]) is None  # no verdicts: a gap, not a zero


def test_cli_plot_and_per_task_table(two_folders, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "radar.png"
    run = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--score", *map(str, two_folders),
                          "--plot", str(png)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert png.stat().st_size > 50_000
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| task "))
    assert lines[header + 2].split("|")[1].strip() == "ASR"
    assert f"-> {two_folders[0] / 'scores.md'}" in run.stdout


def test_plot_without_matplotlib_fails_before_scoring(two_folders, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; import evaluate; "
            f"evaluate.main(['--score', {str(two_folders[0])!r}, '--plot', {str(tmp_path / 'x.png')!r}])")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "pip install" in run.stderr
    assert not (tmp_path / "x.png").exists()
