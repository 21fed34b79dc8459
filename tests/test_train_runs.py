"""align.py / instruct.py as a demanding user meets them: reruns into the same --out, changed flags on --resume,
--max-steps, broken corpus files, unusable records, torn logs, full disks, planted pickles, --init's encoder, the
distributed tear-down.
Through the command line (main(argv)); tiny models, 4 records, a few steps each."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE
from safetensors.torch import load_file
from test_train import ALIGN, flags, log, losses, small_run, torchrun, write_corpus

import align
import data as D
import instruct
import model as M

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread

# 4 records, global batch 2 (micro-batch 1 x accumulation 2): 2 steps per epoch
ARGS = small_run(epochs=1, save_every=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("runs") / "data", ALIGN[:4])


@pytest.fixture(scope="module")
def finished(corpus, tiny_dir, tmp_path_factory):
    """A complete 2-step stage-1 run (checkpoints at steps 1 and 2, the final model)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    align.main(flags(tiny_dir, corpus, out, *ARGS))
    return out


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def exits(argv) -> str:
    """The message a run ended with: one clear line or paragraph, no traceback."""
    with pytest.raises(SystemExit) as stop:
        align.main(argv)
    assert isinstance(stop.value.code, str), stop.value.code  # a message: Python exits with status 1
    return stop.value.code


def snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# 1. A fresh run into an --out that holds a run


def test_a_fresh_run_into_a_used_out_is_refused_unless_overwrite(finished, corpus, tiny_dir, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    message = exits(flags(tiny_dir, corpus, out, *ARGS, "--max-steps", 1))
    assert str(out) in message and "--resume" in message and "--overwrite" in message
    assert snapshot(out) == before  # nothing touched

    align.main(flags(tiny_dir, corpus, out, *ARGS, "--max-steps", 1, "--overwrite"))
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000001"]  # the old run's ckpt-0000002 is gone
    assert [r["step"] for r in log(out)] == [1]
    assert losses(out)[1] == losses(finished)[1]  # the same first step, from scratch


# ----------------------------------------------------------------------------------------------------------
# 2. --resume with settings that change the trajectory


def test_resume_refuses_changed_settings_and_names_them(corpus, tiny_dir, tmp_path):
    out = tmp_path / "out"
    align.main(flags(tiny_dir, corpus, out, *ARGS, "--stop-after", 1))
    message = exits(flags(tiny_dir, corpus, out, *ARGS, "--resume", "--seed", 99, "--lr", 0.05))
    assert "seed: 42 -> 99" in message and "lr: 0.01 -> 0.05" in message
    assert "batch_size" not in message and "workers" not in message  # only what differs

    fewer = write_corpus(tmp_path / "fewer", ALIGN[:2])
    message = exits(flags(tiny_dir, fewer, out, *ARGS, "--resume", "--batch-size", 2, "--grad-accum", 1))
    assert "data_records" in message and "batch_size: 1 -> 2" in message and "grad_accum" not in message
    message = exits(flags(tiny_dir, corpus, out, *ARGS, "--resume", "--max-steps", 3))
    assert "max_steps: 0 -> 3" in message and "total_steps: 2 -> 3" in message
    assert log(out)[-1]["step"] == 1  # the refusals changed nothing

    # what does not change the trajectory may change: checkpoint frequency, how many are kept, --stop-after
    align.main(flags(tiny_dir, corpus, out, *ARGS, "--resume", "--save-every", 5, "--keep", 1, "--stop-after", 2))
    assert [r["step"] for r in log(out)] == [1, 2]
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000002"]


# ----------------------------------------------------------------------------------------------------------
# 3. --max-steps is the run's length


def test_max_steps_is_the_run_length_repeating_epochs(finished, corpus, tiny_dir, tmp_path):
    out = tmp_path / "out"
    align.main(flags(tiny_dir, corpus, out, *ARGS, "--max-steps", 5, "--save-every", 10, "--warmup-ratio", 0.4))
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4, 5]  # 2 steps per epoch: epochs 0, 1 and half of 2
    assert [r["lr"] for r in log(out)] == pytest.approx([align.lr_at(t, 5, 2, 1e-2) for t in range(5)])
    assert losses(out)[1] == losses(finished)[1]
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000005"]


# ----------------------------------------------------------------------------------------------------------
# 4. A corpus file that cannot be read: one line naming file, record and byte; exit 1


def records_bytes(records) -> bytes:
    return json.dumps(records, indent=1).encode()


BROKEN = {
    "syntax error in record 2": (records_bytes(ALIGN[:2]).rstrip(b"]\n") + b",\n {\"id\": 3,, }\n]",
                                 ["record 2", "byte "]),
    "non-UTF-8 byte": (records_bytes(ALIGN[:2]).replace(b"red kite", b"red k\xffite"), ["record 0", "byte "]),
    "empty file": (b"", []),
    "one JSON object, not a list": (json.dumps({f"r{i}": r for i, r in enumerate(ALIGN[:4])}, indent=1).encode(),
                                    ["expected a JSON list of records, or JSONL"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_corpus_file_ends_the_run_with_one_line(case, tiny_dir, tmp_path):
    content, says = BROKEN[case]
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    message = exits(flags(tiny_dir, str(bad), tmp_path / "out", *ARGS))
    assert str(bad) in message and all(s in message for s in says), message
    assert "\n" not in message
    assert not (tmp_path / "out" / "log.jsonl").exists()  # no training


def test_a_missing_corpus_file_ends_the_run_with_one_line(tiny_dir, tmp_path):
    message = exits(flags(tiny_dir, str(tmp_path / "nowhere.json"), tmp_path / "out", *ARGS))
    assert str(tmp_path / "nowhere.json") in message and "not found" in message


def test_a_broken_corpus_file_exits_1_without_a_traceback(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(BROKEN["syntax error in record 2"][0])
    result = subprocess.run([sys.executable, str(ROOT / "align.py"), *flags(tiny_dir, str(bad), tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and str(bad) in result.stderr and "record 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------------------------------------
# 5. Unusable records: the loss is the mean over usable micro-batches; a step without any changes nothing

def unusable_layout(tmp_path) -> str:
    """4 records; the first step holds one usable and one unusable record, the second only unusable ones."""
    first, second, third, fourth = D.shuffled_order(4, 42, 0)  # the run's order of epoch 0
    records = [dict(r) for r in ALIGN[:4]]
    for i in (first, third, fourth):
        records[i]["voice"] = ["missing.wav"]
    return write_corpus(tmp_path / "unusable", records), records[second]


def assert_step_two_changed_nothing(out):
    one, two = out / "ckpt-0000001", out / "ckpt-0000002"
    w1, w2 = load_file(one / "trainable.safetensors"), load_file(two / "trainable.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    o1, o2 = torch.load(one / "optimizer.pt"), torch.load(two / "optimizer.pt")
    for name, state in o1["state"].items():
        assert all(torch.equal(v, o2["state"][name][k]) for k, v in state.items()), name
    assert [r.get("skipped_step", False) for r in log(out)] == [False, True]
    assert log(out)[1]["loss"] is None and log(out)[1]["skipped"] == 2


def test_unusable_records_do_not_change_the_numbers(tiny_dir, tmp_path):
    corpus, usable = unusable_layout(tmp_path)
    alone = tmp_path / "alone"
    align.main(flags(tiny_dir, write_corpus(tmp_path / "one", [usable]), alone, "--batch-size", 1, "--grad-accum",
                     1, "--max-steps", 1))
    out = tmp_path / "out"
    align.main(flags(tiny_dir, corpus, out, *ARGS))
    first = log(out)[0]
    assert first["loss"] == pytest.approx(log(alone)[0]["loss"], rel=1e-6)  # not halved by the unusable one
    assert first["grad_norm"] == pytest.approx(log(alone)[0]["grad_norm"], rel=1e-5)
    assert first["skipped"] == 1
    assert_step_two_changed_nothing(out)


def test_two_ranks_agree_on_unusable_records(tiny_dir, tmp_path):
    """Rank 0 has the unusable record of step 1, rank 1 the usable one; step 2 has none on either rank."""
    corpus, _ = unusable_layout(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    align.main(flags(tiny_dir, corpus, one, *ARGS))
    torchrun("align.py", flags(tiny_dir, corpus, two, *ARGS, "--grad-accum", 1))
    assert log(two)[0]["loss"] == pytest.approx(log(one)[0]["loss"], rel=1e-6)
    assert log(two)[0]["grad_norm"] == pytest.approx(log(one)[0]["grad_norm"], rel=1e-5)
    assert_step_two_changed_nothing(two)


# ----------------------------------------------------------------------------------------------------------
# 9. Small things that lose work: a torn log line, the log rewrite, the final artifact, a full disk


def test_resume_tolerates_a_torn_last_log_line_and_rewrites_the_log_in_one_rename(finished, corpus, tiny_dir,
                                                                                 tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = flags(tiny_dir, corpus, out, *ARGS)
    align.main(args + ["--stop-after", "1"])
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 6.1')  # killed mid-write
    before = (out / "log.jsonl").read_bytes()

    real_write_text = Path.write_text

    def crash(path, text, *a, **k):  # dies half-way through writing a log
        if "log.jsonl" in path.name:
            real_write_text(path, text[: len(text) // 2], *a, **k)
            raise OSError("killed (injected)")
        return real_write_text(path, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="injected"):
        align.main(args + ["--resume"])
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert (out / "log.jsonl").read_bytes() == before  # the old log is whole

    align.main(args + ["--resume"])
    assert losses(out) == losses(finished)


def test_a_failed_final_save_leaves_no_half_model(finished, corpus, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = flags(tiny_dir, corpus, out, *ARGS)

    def full_disk(model, out_dir):  # projector.safetensors and llaso_config.json are already written
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / "mm_audio_aligner.bin"))

    monkeypatch.setattr(align, "export_aligner", full_disk)
    message = exits(args)
    assert str(out) in message and "No space left on device" in message
    assert not (out / "llaso_config.json").exists() and not (out / "projector.safetensors").exists()
    monkeypatch.undo()

    align.main(args + ["--resume"])  # the last checkpoint is the end of the schedule: only the model is written
    assert losses(out) == losses(finished) and not list(out.glob(".tmp-*"))
    want, got = load_file(finished / "projector.safetensors"), load_file(out / "projector.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert torch.equal(torch.load(out / "mm_audio_aligner.bin")["model.mm_audio_aligner.projector.0.weight"],
                       torch.load(finished / "mm_audio_aligner.bin")["model.mm_audio_aligner.projector.0.weight"])


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_previous_one(corpus, tiny_dir, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "out"
    real_save_file = align.save_file

    def full_disk(tensors, path, *a, **k):
        if align.checkpoints(out):  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *a, **k)

    monkeypatch.setattr(align, "save_file", full_disk)
    message = exits(flags(tiny_dir, corpus, out, *ARGS))
    assert str(out / "ckpt-0000002") in message and "No space left on device" in message
    assert str(out / "ckpt-0000001") in message and "intact" in message
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000001"] and not list(out.glob(".tmp-*"))
    assert set(load_file(out / "ckpt-0000001" / "trainable.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# 10. Checkpoints hold tensors and plain values only; a planted pickle does not run


class Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker file
        return open, (str(self.marker), "w")


def test_checkpoints_load_with_weights_only_and_a_planted_pickle_does_not_run(finished, corpus, tiny_dir, tmp_path):
    for name in ("state.pt", "optimizer.pt"):
        torch.load(finished / "ckpt-0000001" / name, weights_only=True)
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("state.pt", "optimizer.pt"):
        torch.save({"step": 1, "payload": Planted(marker)}, out / "ckpt-0000002" / name)
    message = exits(flags(tiny_dir, corpus, out, *ARGS, "--resume"))
    assert "state.pt" in message and "not loaded" in message
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# 11. --init with a stage-2 artifact that carries its own encoder


def test_init_keeps_the_artifacts_own_encoder_unless_encoder_is_given(tiny_config, tiny_dir, tmp_path):
    torch.manual_seed(0)
    artifact = M.LLaSO.from_parts(tiny_config)
    with torch.no_grad():
        artifact.encoder.conv1.weight.add_(1.0)  # an encoder that exists only inside the artifact
    artifact.own_encoder = True
    artifact.save(tmp_path / "artifact", with_llm=True)
    corpus = write_corpus(tmp_path / "data", ALIGN[:1])
    common = ["--preset", "tiny", "--init", tmp_path / "artifact", "--data", corpus, "--audio-root", SAMPLE / "audio",
              "--workers", 0, "--batch-size", 1, "--grad-accum", 1, "--max-steps", 1]

    instruct.main(list(map(str, common + ["--out", tmp_path / "own"])))
    own = M.LLaSO.load(tmp_path / "own").encoder.conv1.weight
    assert torch.equal(own, artifact.encoder.conv1.weight)

    instruct.main(list(map(str, common + ["--out", tmp_path / "given", "--encoder", tiny_dir / "encoder"])))
    given = M.LLaSO.load(tmp_path / "given").encoder.conv1.weight
    assert torch.equal(given, M.LLaSO.from_parts(tiny_config).encoder.conv1.weight)


# ----------------------------------------------------------------------------------------------------------
# Tear-down: DDP's reducer must not outlive the process group (it would destroy the group holding the GIL, which
# gloo's threads may need to free a finished collective's tensors: an occasional hang at the end of a run)


def test_ddp_is_gone_before_the_process_group_is_destroyed(corpus, tiny_dir, tmp_path, monkeypatch):
    import gc
    import socket

    from torch.nn.parallel import DistributedDataParallel as DDP

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))  # a one-rank torchrun: the distributed path, with DDP
    real_destroy, alive = align.dist.destroy_process_group, []

    def destroy(*a, **k):
        alive.append(sum(type(o) is DDP for o in gc.get_objects()))
        return real_destroy(*a, **k)

    monkeypatch.setattr(align.dist, "destroy_process_group", destroy)
    align.main(flags(tiny_dir, corpus, tmp_path / "out", *ARGS, "--stop-after", 1))
    assert alive == [0]
