"""Generation half of evaluate.py: the sample end to end, resume after a crash, batched == batch 1, error entries,
single-record inference, torchrun == one process. A sharpened tiny stage-2 model, 12 new tokens."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE
from test_model import RECORDS, full_logits, make_batch, sharpen

import evaluate as ev
import model as M

EVAL, AUDIO_ROOT, TOKENS = SAMPLE / "LLaSO-Eval", SAMPLE / "audio", 12
SMALL = [EVAL / "audio_text" / "dolly_instruction_0_test.json", EVAL / "pure_audio" / "alpaca_gpt4_end_test.json"]


pytestmark = pytest.mark.usefixtures("one_thread")


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def ckpt(tiny_config, tmp_path_factory):
    """A stage-2 artifact whose answers are varied, non-empty and of different lengths."""
    torch.manual_seed(0)
    model = sharpen(M.LLaSO.from_parts(tiny_config))
    eot = model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    common = model.tokenizer.encode(" the", add_special_tokens=False)[0]
    with torch.no_grad():  # <|eot_id|> = a scaled copy of a common token: rows stop wherever it would have won
        model.llm.get_input_embeddings().weight[eot] *= 0
        model.llm.get_input_embeddings().weight[eot] += 1.05 * model.llm.get_input_embeddings().weight[common]
    folder = tmp_path_factory.mktemp("ckpt") / "instruct"
    model.save(folder, with_llm=True)
    return folder


def generate(ckpt, data, out, **kwargs):
    return ev.generate_files(ckpt, [str(d) for d in data], AUDIO_ROOT, out, max_new_tokens=TOKENS, workers=0,
                             **kwargs)


def answers(path):
    return [r["answer"] for r in json.loads(path.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def full(ckpt, tmp_path_factory):
    """The whole sample eval set through the command line (batch 16), scored."""
    out = tmp_path_factory.mktemp("eval") / "results"
    ev.main(["--ckpt", str(ckpt), "--data", str(EVAL), "--audio-root", str(AUDIO_ROOT), "--out", str(out),
             "--max-new-tokens", str(TOKENS), "--workers", "0", "--plot", str(out.parent / "scores.png")])
    return out


def test_sample_end_to_end(full):
    inputs = sorted(EVAL.rglob("*_test.json"))
    assert len(inputs) == 7
    assert (full.parent / "scores.png").read_bytes().startswith(b"\x89PNG")  # --plot after generation too
    all_answers = []
    for path in inputs:
        records = json.loads(path.read_text(encoding="utf-8"))
        text = (full / path.name).read_text(encoding="utf-8")
        results = json.loads(text)
        assert text == json.dumps(results, indent=2, ensure_ascii=False) + "\n"  # the reference layout
        assert len(results) == len(records)
        for record, result in zip(records, results):  # input order, every original field, then the answer
            assert list(result) == list(record) + ["answer"]
            assert {k: v for k, v in result.items() if k != "answer"} == record
            assert isinstance(result["answer"], str)
        all_answers += [r["answer"] for r in results]
    assert sum(bool(a) for a in all_answers) > 0.9 * len(all_answers)
    assert len(set(all_answers)) > 0.8 * len(all_answers)  # input-dependent outputs: the comparisons below mean something
    assert len({len(a) for a in all_answers}) > 5
    assert not list((full / ev.PARTIAL).glob("*.jsonl"))
    scores = json.loads((full / "scores.json").read_text())
    assert set(scores) == {"mode", "files", "summary", "tasks", "categories", "modalities", "notes", "skipped"}
    assert sorted(scores["files"]) == sorted(p.stem for p in inputs) and scores["mode"] == "default"
    assert scores["summary"]["n_items"] == 64 and "accuracy" in scores["summary"] and "wer" in scores["summary"]
    assert (full / "scores.md").exists()


def test_batch_size_one_gives_the_same_answers(ckpt, full, tmp_path):
    """(a,t) prompts: the text after the audio varies, so the batch of 16 pads its rows by different amounts."""
    generate(ckpt, SMALL[:1], tmp_path, batch_size=1)
    assert answers(tmp_path / SMALL[0].name) == answers(full / SMALL[0].name)


def test_interrupted_run_resumes_without_duplicates(ckpt, full, tmp_path, capsys):
    assert generate(ckpt, SMALL, tmp_path, batch_size=4, stop_after=3)[0] == 1  # 6 + 4 of 12 records
    first, second = (tmp_path / p.name for p in SMALL)
    partial = tmp_path / ev.PARTIAL / f"{SMALL[1].stem}.rank0.jsonl"
    assert first.exists() and not second.exists()
    lines = partial.read_text().splitlines()
    assert len(lines) == len({json.loads(line)["i"] for line in lines}) == 4
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:9])  # a crash in the middle of a line
    done_at = first.stat().st_mtime_ns
    capsys.readouterr()
    assert generate(ckpt, SMALL, tmp_path, batch_size=4)[:2] == (2, 2)
    assert "1 already done, 3 records to answer" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == done_at  # completed files are not redone
    for path in SMALL:
        assert answers(tmp_path / path.name) == answers(full / path.name)
        assert json.loads((tmp_path / path.name).read_text()) == json.loads((full / path.name).read_text())
    assert not partial.exists()
    with pytest.raises(SystemExit, match="predictions of another run"):  # never mix settings in one directory
        ev.generate_files(ckpt, [str(SMALL[0])], AUDIO_ROOT, tmp_path, max_new_tokens=TOKENS + 1, workers=0)


def test_a_rerun_with_retrained_weights_or_other_data_is_refused(ckpt, tmp_path):
    """.partial/run.json fingerprints the model's files and the data: the same --ckpt path holding retrained weights,
    another --audio-root or an edited test file must not keep the old answers, nor mix in new ones."""
    model_dir, copy, out = tmp_path / "instruct", tmp_path / "copy", tmp_path / "out"
    shutil.copytree(ckpt, model_dir)
    shutil.copytree(ckpt, copy)

    def run(ckpt_dir, data=SMALL[0], audio_root=AUDIO_ROOT):
        ev.main(["--ckpt", str(ckpt_dir), "--data", str(data), "--audio-root", str(audio_root), "--out", str(out),
                 "--max-new-tokens", "4", "--workers", "0"])

    run(model_dir)
    done = (out / SMALL[0].name).stat().st_mtime_ns
    run(copy)  # the same weights in another folder are the same model: accepted, nothing redone
    assert (out / SMALL[0].name).stat().st_mtime_ns == done

    retrained = M.LLaSO.load(model_dir)
    with torch.no_grad():
        retrained.projector[0].bias.add_(0.01)
    retrained.save(model_dir, with_llm=True)
    with pytest.raises(SystemExit, match="model_files: ckpt/projector.safetensors"):
        run(model_dir)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit, match="audio_root: "):
        run(copy, audio_root=tmp_path / "elsewhere")
    records = json.loads(SMALL[0].read_text(encoding="utf-8"))
    records[2]["conversations"][0]["value"] += " Answer briefly."
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / SMALL[0].name).write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(SystemExit, match=f"test_files: {SMALL[0].stem}"):
        run(copy, data=tmp_path / "data" / SMALL[0].name)


def test_a_large_file_is_fingerprinted_by_its_size_and_sampled_blocks(tmp_path):
    """Over 16 MiB a weight file is sampled: the same bytes elsewhere match; a changed size, last byte or range of
    2 MiB (any tensor of 1/15 of the file) does not."""
    data = bytearray(torch.randint(0, 256, (20 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                     .numpy().tobytes())
    changes = {"same": lambda d: d, "size": lambda d: d + b"\0", "last byte": lambda d: d[:-1] + bytes([d[-1] ^ 1]),
               "middle": lambda d: d[: 9 << 20] + bytes(2 << 20) + d[11 << 20:]}
    prints = {}
    for name, change in changes.items():
        (tmp_path / name).write_bytes(change(bytes(data)))
        prints[name] = ev.file_fingerprint(tmp_path / name)
    (tmp_path / "original").write_bytes(data)
    assert ev.file_fingerprint(tmp_path / "original") == prints["same"]
    assert len(set(prints.values())) == len(prints)


def test_bad_records_get_error_entries_and_the_rest_is_evaluated(ckpt, full, tmp_path):
    records = json.loads(SMALL[0].read_text())
    records[1]["voice"] = ["eval/nowhere/missing.wav"]
    del records[3]["conversations"]
    data = tmp_path / "data" / SMALL[0].name
    data.parent.mkdir()
    data.write_text(json.dumps(records, indent=2))
    out = tmp_path / "out"
    _, _, errors = generate(ckpt, [data], out)
    results, want = json.loads((out / data.name).read_text()), answers(full / data.name)
    assert len(results) == len(records) and len(errors) == 2
    assert "error" not in results[0] and [r["answer"] for r in results] == [a if i not in (1, 3) else ""
                                                                            for i, a in enumerate(want)]
    assert results[1]["error"].startswith(f"{data.name} record 1: audio file not found")
    assert "missing.wav" in results[1]["error"] and results[1]["voice"] == records[1]["voice"]
    assert results[3]["error"].startswith(f"{data.name} record 3: expected 'conversations'")
    scores = ev.score_directory(out)
    assert scores["files"][data.stem]["errors"] == 2 and scores["files"][data.stem]["n"] == 5  # no gold: unscored
    assert scores["summary"]["errors"] == 2 and any("2 records could not be evaluated" in n for n in scores["notes"])


def test_evaluation_in_bf16_has_the_numerics_of_training(ckpt):
    """load_model is training's model: encoder and LLM loaded in bf16 through from_pretrained, which keeps RoPE's
    inv_freq in fp32, and the projector in bf16, as training's autocast computes its fp32 weights. Casting the whole
    model (as evaluation did) rounded inv_freq to bf16."""
    bf16 = torch.bfloat16
    evaluation = ev.load_model(ckpt, dtype=bf16)
    training = M.LLaSO.load(ckpt, encoder_dtype=bf16, llm_dtype=bf16)  # frozen parts, as align.py loads them
    assert {k: b.dtype for k, b in evaluation.named_buffers()} == {k: b.dtype for k, b in training.named_buffers()}
    assert {p.dtype for p in evaluation.parameters()} == {bf16}
    batch = make_batch(evaluation.tokenizer, RECORDS[:3], chunks=[1, 2, 1])  # 1,500+ positions: RoPE matters
    with torch.no_grad():
        with torch.autocast("cpu", dtype=bf16):
            want = full_logits(training, batch)[0]
        torch.testing.assert_close(full_logits(evaluation, batch)[0], want, rtol=0, atol=0)


def test_single_record_inference(ckpt, full):
    record = json.loads(SMALL[1].read_text())[0]
    human, wav = record["conversations"][0]["value"], AUDIO_ROOT / record["voice"][0].replace("\\", "/")
    want = answers(full / SMALL[1].name)[0]
    cli = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--audio", str(wav), "--prompt", human,
           "--max-new-tokens", str(TOKENS)]
    out = subprocess.run(cli, capture_output=True, check=True, timeout=120, env=ONE_THREAD)
    assert out.stdout.decode("utf-8") == want + "\n"
    model = ev.load_model(ckpt)
    assert human.endswith("<audio>")  # a prompt without the placeholder gets it appended: the same record
    assert ev.answer_one(model, human.removesuffix("<audio>"), [wav], TOKENS) == want
    assert isinstance(ev.answer_one(model, "What is the capital of France?", [], TOKENS), str)  # text only
    assert ev.human_turn(None, 1) == "<audio>"  # audio only: the spoken instruction is the whole turn


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_two_processes_equals_one(ckpt, full, tmp_path):
    """Two ranks finish a run that one process began and a crash ended, and answer a third file from scratch."""
    files = SMALL + [EVAL / "text_audio" / "slurp_Intent_Prediction_test.json"]
    assert generate(ckpt, SMALL, tmp_path, batch_size=4, stop_after=3)[0] == 1  # 6 + 4 of 12 records
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cli = [torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "evaluate.py"), "--ckpt", str(ckpt),
           "--data", *map(str, files), "--audio-root", str(AUDIO_ROOT), "--out", str(tmp_path),
           "--max-new-tokens", str(TOKENS), "--workers", "0", "--batch-size", "4"]
    run = subprocess.run(cli, timeout=300, capture_output=True, text=True, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-4000:]
    todo = re.findall(r"rank \d/2: 3 test files, 1 already done, (\d+) records to answer", run.stderr)
    assert len(todo) == 2 and sum(map(int, todo)) == 2 + 8  # only what is missing is answered, split across ranks
    for path in files:
        assert (tmp_path / path.name).read_bytes() == (full / path.name).read_bytes()
    assert not list((tmp_path / ev.PARTIAL).glob("*.jsonl")) and (tmp_path / "scores.json").exists()
