"""align.py + instruct.py: what trains, DDP == one process, exact resume (one process and two ranks), crash-safe
checkpoints, the LR schedule, memorisation, FSDP2 == DDP. CPU, tiny models; runs are shared between tests through
module-scoped fixtures."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SAMPLE
from safetensors.torch import load_file

import align
import instruct
import model as M

ALIGN = json.loads((SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json").read_text())


def write_corpus(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(records, indent=2))
    return str(folder / "train.json")


def flags(tiny_dir, corpus, out, *extra):
    return ["--preset", "tiny", "--encoder", str(tiny_dir / "encoder"), "--llm", str(tiny_dir / "llm"),
            "--data", corpus, "--audio-root", str(SAMPLE / "audio"), "--out", str(out), "--workers", "0",
            *map(str, extra)]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def torchrun(script, args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the ranks too, not only the launcher
            raise
    result = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


# ----------------------------------------------------------------------------------------------------------
# Stage 1: 4 Align records, global batch 2, two epochs = 4 steps (checkpoints at 2 and 4)

STAGE1_ARGS = ["--batch-size", 1, "--grad-accum", 2, "--epochs", 2, "--save-every", 2, "--keep", 5, "--lr", 1e-2,
               "--warmup-ratio", 0.3]


@pytest.fixture(scope="module")
def stage1(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    corpus = write_corpus(root / "data", ALIGN[:4])
    out = root / "out"
    model = align.main(flags(tiny_dir, corpus, out, *STAGE1_ARGS))
    return corpus, out, model


def test_stage1_trains_only_the_projector(stage1, tiny_config):
    _, out, trained = stage1
    torch.manual_seed(42)
    fresh = M.LLaSO.from_parts(tiny_config)
    assert not torch.equal(trained.projector[0].weight, fresh.projector[0].weight)
    for part in ("encoder", "llm"):
        mine, theirs = getattr(trained, part).state_dict(), getattr(fresh, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), part
    keys = set(load_file(out / "ckpt-0000004" / "trainable.safetensors"))
    assert keys == {f"projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    # the artifacts: LLaSO.load-able projector, and the reference's bf16 mm_audio_aligner.bin
    loaded = M.LLaSO.load(out)
    assert torch.equal(loaded.projector[2].weight, trained.projector[2].weight)
    aligner = torch.load(out / "mm_audio_aligner.bin")
    assert set(aligner) == {f"model.mm_audio_aligner.{k}" for k in keys}
    assert aligner["model.mm_audio_aligner.projector.0.weight"].dtype == torch.bfloat16
    assert torch.equal(aligner["model.mm_audio_aligner.projector.0.weight"],
                       trained.projector[0].weight.detach().bfloat16())


def test_lr_schedule_is_linear_warmup_then_half_cosine(stage1):
    assert align.warmup_steps(23_400, 0.0015) == 36 and align.warmup_steps(52_700, 0.01) == 527
    assert align.warmup_steps(4, 0.3) == 2  # ceil(1.2)
    peak = 1e-3
    assert align.lr_at(0, 100, 10, peak) == 0.0
    assert align.lr_at(5, 100, 10, peak) == pytest.approx(5e-4)
    assert align.lr_at(10, 100, 10, peak) == pytest.approx(1e-3)
    assert align.lr_at(55, 100, 10, peak) == pytest.approx(5e-4)  # half-way through the cosine
    assert align.lr_at(40, 100, 10, peak) == pytest.approx(1e-3 * (1 + 0.5) / 2)  # cos(pi/3) = 0.5
    assert align.lr_at(100, 100, 10, peak) == pytest.approx(0.0)
    # the run used them: 4 steps, 2 warm-up steps, peak 1e-2 -> 0, 5e-3, 1e-2, 5e-3
    _, out, _ = stage1
    assert [r["lr"] for r in log(out)] == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])


def test_resume_is_exact_and_a_crash_during_a_save_keeps_the_previous_checkpoint(stage1, tiny_dir, tmp_path,
                                                                                monkeypatch):
    corpus, full, _ = stage1
    out = tmp_path / "out"
    args = flags(tiny_dir, corpus, out, *STAGE1_ARGS)
    align.main(args + ["--stop-after", "1"])  # stops mid-epoch 0, checkpoint at step 1
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000001"]

    real_save = torch.save

    def crash(obj, path, *a, **k):  # trainable.safetensors is already written when the optimizer is saved
        if str(path).endswith("optimizer.pt"):
            assert (path.parent / "trainable.safetensors").exists()
            raise OSError("disk full (injected)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SystemExit, match="injected"):
        align.main(args + ["--resume"])  # trains step 2, fails to write ckpt-0000002
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000001"]

    align.main(args + ["--resume"])  # from step 1, across the epoch boundary, to the end
    assert [p.name for p in align.checkpoints(out)] == ["ckpt-0000001", "ckpt-0000002", "ckpt-0000004"]
    assert not list(out.glob(".tmp-*"))
    assert losses(out) == losses(full)  # steps 2..4 recomputed after the resume: bit-identical
    assert len(losses(out)) == 4
    want, got = load_file(full / "projector.safetensors"), load_file(out / "projector.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ----------------------------------------------------------------------------------------------------------
# Stage 2: DDP (2 ranks x accum 1) == one process (accum 2) == FSDP2 (2 ranks)

STAGE2_ARGS = ["--batch-size", 1, "--max-steps", 2, "--lr", 1e-3, "--warmup-ratio", 0, "--save-every", 10]


@pytest.fixture(scope="module")
def stage2_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("stage2") / "data",
                        json.loads((SAMPLE / "LLaSO-Instruct/merged/stage2_train.json").read_text())[::17][:8])


@pytest.fixture(scope="module")
def ddp2(stage1, stage2_corpus, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    torchrun("instruct.py", flags(tiny_dir, stage2_corpus, out, *STAGE2_ARGS, "--grad-accum", 1,
                                  "--projector", stage1[1]))
    return out


def test_two_ranks_equal_one_process_with_twice_the_accumulation(ddp2, stage1, stage2_corpus, tiny_dir, tmp_path):
    out = tmp_path / "one"
    instruct.main(flags(tiny_dir, stage2_corpus, out, *STAGE2_ARGS, "--grad-accum", 2, "--projector", stage1[1]))
    assert losses(out) == pytest.approx(losses(ddp2), rel=1e-5)
    assert len(losses(out)) == 2
    one, two = M.LLaSO.load(out), M.LLaSO.load(ddp2)
    for (name, p), q in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    start = load_file(stage1[1] / "projector.safetensors")["0.weight"]
    assert not torch.equal(one.projector[0].weight, start)  # the comparison is between trained models


def test_two_ranks_resume_exactly(ddp2, stage1, stage2_corpus, tiny_dir, tmp_path):
    out = tmp_path / "resumed"
    args = flags(tiny_dir, stage2_corpus, out, *STAGE2_ARGS, "--grad-accum", 1, "--projector", stage1[1])
    torchrun("instruct.py", args + ["--stop-after", "1"])
    torchrun("instruct.py", args + ["--resume"])
    assert losses(out) == losses(ddp2)  # bit-identical
    resumed, whole = M.LLaSO.load(out), M.LLaSO.load(ddp2)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), whole.parameters()))


def test_fsdp2_loss_equals_ddp(ddp2, stage1, stage2_corpus, tiny_dir, tmp_path):
    out = tmp_path / "fsdp"
    torchrun("instruct.py", flags(tiny_dir, stage2_corpus, out, *STAGE2_ARGS, "--grad-accum", 1,
                                  "--projector", stage1[1], "--fsdp"))
    ddp_losses, fsdp_losses = losses(ddp2), losses(out)
    assert fsdp_losses[1] == pytest.approx(ddp_losses[1], rel=1e-6)
    assert fsdp_losses[2] == pytest.approx(ddp_losses[2], rel=1e-4)  # after one sharded optimizer step
    a, b = M.LLaSO.load(out), M.LLaSO.load(ddp2)  # the gathered FSDP model is a normal stage-2 artifact
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------
# Learning: stage 2 memorises 4 ASR clips that differ only in their audio


@pytest.fixture(scope="module")
def memorised(stage1, tiny_dir, tmp_path_factory):
    # Four short sentences, four voices, the same instruction: only the audio tells which answer is wanted.
    clips = [ALIGN[i] for i in (21, 23, 7, 12)]
    records = [dict(r, conversations=[{"from": "human", "value": "Please transcribe the audio.<audio>"},
                                      r["conversations"][1]]) for r in clips]
    assert len({r["metadata"]["speaker"] for r in records}) == 4
    root = tmp_path_factory.mktemp("memorise")
    corpus = write_corpus(root / "data", records)
    out = root / "out"
    model = instruct.main(flags(tiny_dir, corpus, out, "--batch-size", 1, "--grad-accum", 1, "--epochs", 75,
                                "--lr", 3e-3, "--save-every", 1000, "--projector", stage1[1]))
    return records, out, model


def test_stage2_memorises_four_clips(memorised):
    records, out, _ = memorised
    model = M.LLaSO.load(out).eval()  # the saved artifact, as evaluate.py loads it
    import data as D

    corpus = D.Corpus([out.parent / "data" / "train.json"])
    dataset = D.LLaSODataset(corpus, model.tokenizer, model.features, SAMPLE / "audio", eval_mode=True)
    answers = model.generate(D.collate([dataset[i] for i in range(4)]), max_new_tokens=32)
    assert answers == [r["conversations"][1]["value"] for r in records]
    # Last 4 steps = each clip once: below what knowing the 4 sentences without telling the clips apart allows
    # (log 4 on the first token, ~0.1 per token).
    assert sum(r["loss"] for r in log(out)[-4:]) / 4 < 0.07


def test_stage2_trains_projector_and_llm_with_new_rows_never_the_encoder(memorised, stage1, tiny_config):
    _, _, trained = memorised
    fresh = M.LLaSO.from_parts(tiny_config, projector=str(stage1[1] / "projector.safetensors"))
    assert not torch.equal(trained.projector[0].weight, fresh.projector[0].weight)
    assert all(torch.equal(v, fresh.encoder.state_dict()[k]) for k, v in trained.encoder.state_dict().items())
    changed = [k for k, v in trained.llm.state_dict().items() if not torch.equal(v, fresh.llm.state_dict()[k])]
    assert len(changed) == len(fresh.llm.state_dict())  # every LLM tensor (tied head = embedding) moved
    rows = [fresh.tokenizer.convert_tokens_to_ids(t) for t in ["<Audio>", "</Audio>", "<audio_start>", "<audio_end>"]]
    new, old = trained.llm.get_input_embeddings().weight[rows], fresh.llm.get_input_embeddings().weight[rows]
    assert (new - old).abs().amax(1).min() > 0  # each new token row trained
