"""--report-to wandb / tensorboard: every log.jsonl field of every step reaches the tracker once, the config once,
and --resume continues the same tracked run without sending a step twice. Offline: nothing leaves the machine."""

import json
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import ROOT
from test_train import ALIGN, flags, log, small_run, write_corpus

import align

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread

# 6 records, global batch 2: 3 steps per epoch, 2 epochs = 6 steps; a checkpoint every 2
ARGS = small_run(epochs=2, save_every=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("tracking") / "data", ALIGN[:6])


def interrupted_then_resumed(tiny_dir, corpus, out, tracker):
    """Steps 1-5, then a crash that loses step 5's checkpoint, then --resume from step 4: step 5 runs again."""
    align.main(flags(tiny_dir, corpus, out, *ARGS, "--report-to", tracker, "--stop-after", 5))
    shutil.rmtree(out / "ckpt-0000005")
    align.main(flags(tiny_dir, corpus, out, *ARGS, "--report-to", tracker, "--resume"))
    return log(out)


def test_tensorboard_gets_every_step_once_and_the_config(tiny_dir, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    lines = interrupted_then_resumed(tiny_dir, corpus, out, "tensorboard")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for field in ("loss", "lr", "grad_norm", "tokens_per_s", "step_s", "skipped", "audio_cut"):
        scalars = events.Scalars(field)
        assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6], field  # one folder, no step twice
        assert [e.value for e in scalars] == pytest.approx([r[field] for r in lines], rel=1e-6), field
    config = events.Tensors("config/text_summary")
    assert len(config) == 1 and b'"lr": 0.01' in config[0].tensor_proto.string_val[0]


def wandb_records(path):
    """The records of an offline .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks each
    have a 7-byte header (crc32, length, type: 1 whole record, 2 first part, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_continues_the_same_run_without_duplicate_steps(tiny_dir, corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    lines = interrupted_then_resumed(tiny_dir, corpus, out, "wandb")
    run_id = json.loads((out / "tracker.json").read_text())["run_id"]
    sessions = sorted((out / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)  # one tracked run, resumed
    history, configs = [], []
    for session in sessions:
        for record in wandb_records(session / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({"_step": record.history.step.num, **{
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}})
            if kind in ("run", "config"):  # the config comes with the run record, and in later updates
                update = (record.run.config if kind == "run" else record.config).update
                configs += [json.loads(item.value_json) for item in update
                            if (item.key or "/".join(item.nested_key)) == "lr"]
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5, 6]
    trajectory = ("loss", "lr", "grad_norm", "skipped", "audio_cut")  # step 5's timings are the first run's
    for h, r in zip(history, lines):
        assert {k: h[k] for k in trajectory} == pytest.approx({k: r[k] for k in trajectory}, rel=1e-6)
        assert h["tokens_per_s"] > 0 and h["step_s"] > 0
    assert configs and set(configs) == {0.01}


def test_a_missing_tracker_package_stops_before_any_model_is_loaded(tiny_dir, corpus, tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; sys.path.insert(0, 'tests'); import align; "
            "align.M.LLaSO.from_parts = None; "  # loading a model now would raise a TypeError
            f"align.main({[str(a) for a in flags(tiny_dir, corpus, tmp_path / 'out', *ARGS, '--report-to', 'wandb')]})")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "pip install wandb" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
