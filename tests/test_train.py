"""align.py + instruct.py: what trains, DDP == one process, exact resume (one process and two ranks), crash-safe
checkpoints, the LR schedule, memorisation, FSDP2 == DDP; FSDP2's sharded gradients and saves; the FLOPs behind MFU.
CPU, tiny models; runs are shared between tests through module-scoped fixtures."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, SAMPLE
from safetensors.torch import load_file
from test_model import RECORDS, make_batch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import align
import instruct
import model as M

ALIGN = json.loads((SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json").read_text())
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread


def small_run(epochs, save_every):
    """Flags of a short run: micro-batch 1 x accumulation 2 (global batch 2), lr 1e-2, no warm-up, keep 5."""
    return ["--batch-size", 1, "--grad-accum", 2, "--epochs", epochs, "--save-every", save_every, "--keep", 5,
            "--lr", 1e-2, "--warmup-ratio", 0]


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
            stdout, stderr = process.communicate()
            raise AssertionError(f"timed out\n{stdout[-2000:]}\n{stderr[-6000:]}") from None
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


# ----------------------------------------------------------------------------------------------------------
# FSDP2 in this process (a 1-rank gloo group): gradients stay sharded, saves gather only what trains, and the
# model reaches the device only as shards


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield align.Env(rank=0, local_rank=0, world=1, distributed=True, device=torch.device("cpu"), precision="bf16")
    dist.destroy_process_group()


def fsdp_run(tiny_dir, out, stage, env, **config):
    cfg = align.Config(encoder=str(tiny_dir / "encoder"), llm=str(tiny_dir / "llm"), out=str(out), fsdp=True,
                       stack=1, batch_size=1, **config)
    model = align.build_model(cfg, stage, env)
    wrapped = align.wrap(model, cfg, env)
    params = [p for p in model.parameters() if p.requires_grad]
    return cfg, model, wrapped, params, torch.optim.AdamW(params, lr=1e-3)


def one_record(model) -> dict:
    return dict(align.stand_in_batch(model), skipped=[], cut=[])  # as the loader's batches: nothing skipped


def test_fsdp_reduce_scatters_every_micro_batch_so_no_unsharded_gradient_accumulates(one_rank, tiny_dir, tmp_path):
    """With gradient sync off, FSDP2 keeps each micro-batch's gradient unsharded (the whole fp32 LLM per GPU) until
    the last one. Synced, the sharded parameters hold their (sharded) gradients after the first micro-batch."""
    cfg, model, wrapped, params, optimizer = fsdp_run(tiny_dir, tmp_path, instruct.STAGE2, one_rank, grad_accum=2)
    seen = []

    def batches():
        yield one_record(model)
        seen.append([p.grad for p in params])  # between the two micro-batches
        yield one_record(model)

    computed_in = set()  # bf16 precision: FSDP2 gathers the fp32 shards as bf16 weights for the forward
    model.llm.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: computed_in.add(m.up_proj.weight.dtype))
    stats, norm = align.train_step(wrapped, model, optimizer, params, batches(), 1e-3, [], cfg, one_rank, None)
    assert stats.usable == 2 and norm > 0
    assert all(isinstance(g, DTensor) and g.placements == p.placements for g, p in zip(seen[0], params))
    assert computed_in == {torch.bfloat16} and {p.dtype for p in params} == {torch.float32}


def save(tensors: dict) -> bytes:
    """The bytes of a safetensors file of these tensors."""
    from safetensors.torch import save

    return save(tensors)


def test_saves_gather_only_the_trainable_weights_and_write_the_same_bytes(one_rank, tiny_dir, tmp_path,
                                                                          monkeypatch):
    cfg, model, wrapped, params, optimizer = fsdp_run(tiny_dir, tmp_path, align.STAGE1, one_rank, grad_accum=1)
    align.train_step(wrapped, model, optimizer, params, iter([one_record(model)]), 1e-3, [], cfg,
                     one_rank, None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = {k: v.contiguous() for k, v in get_model_state_dict(wrapped, options=full).items() if k in names}

    gathered, redistribute = [], DTensor.redistribute  # full_tensor and get_model_state_dict both gather so

    def spy(self, *args, **kwargs):
        gathered.append(self.numel())
        return redistribute(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "redistribute", spy)
    plan = align.Plan(global_batch=1, steps_per_epoch=10, total=10, warmup=0, end=10)
    align.save_checkpoint(cfg, model, wrapped, optimizer, 1, plan, [], {}, one_rank)
    trainable = sum(p.numel() for p in params)
    assert sum(gathered) == 3 * trainable  # the weights and AdamW's two moments: the frozen LLM never
    gathered.clear()
    align.save_final(cfg, align.STAGE1, model, one_rank)
    assert sum(gathered) == trainable

    ckpt = tmp_path / "ckpt-0000001" / "trainable.safetensors"
    assert ckpt.read_bytes() == save(before)  # byte for byte what gathering the whole model wrote
    assert (tmp_path / "projector.safetensors").read_bytes() == save({k.removeprefix("projector."): v
                                                                      for k, v in before.items()})


def test_without_fsdp_the_saved_weights_are_those_of_the_whole_state(make_tiny):
    model = make_tiny()
    model.requires_grad_(False)
    model.llm.requires_grad_(True)  # stage 2: the tied embedding is one trainable weight
    env = align.Env(0, 0, 1, False, torch.device("cpu"), "fp32")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = {k: v.contiguous() for k, v in get_model_state_dict(model).items() if k in names}
    weights = align.trainable_weights(model, env)
    assert list(weights) == list(state) and save(weights) == save(state)


def test_fsdp_builds_the_model_off_the_device_and_shards_it_there(tiny_dir):
    """build_model moves the model to the device itself, except under FSDP: there fully_shard moves it one unit at
    a time (the "meta" device stands in for a GPU)."""
    gpu = align.Env(0, 0, 1, False, torch.device("meta"), "bf16")
    cfg = align.Config(encoder=str(tiny_dir / "encoder"), llm=str(tiny_dir / "llm"), stack=1)
    assert {p.device.type for p in align.build_model(cfg, align.STAGE1, gpu).parameters()} == {"meta"}
    cfg.fsdp = True
    assert {p.device.type for p in align.build_model(cfg, align.STAGE1, gpu).parameters()} == {"cpu"}


# ----------------------------------------------------------------------------------------------------------
# MFU: the FLOPs of a micro-batch, counted by hand and by PyTorch; the GPUs' peaks


def stage_model(make_tiny, stage: int, train_encoder: bool = False, **audio):
    model = make_tiny() if not audio else M.LLaSO.from_parts(M.ModelConfig(**{**vars(make_tiny().config), **audio}))
    model.requires_grad_(False)
    for module in [model.projector] + ([model.llm] if stage == 2 else []):
        module.requires_grad_(True)
    if train_encoder:
        for module in align.trainable_encoder(model):
            module.requires_grad_(True)
    return model


def test_batch_flops_is_the_hand_count(make_tiny):
    model = stage_model(make_tiny, 1)
    enc, llm = model.encoder.config, model.llm.config
    batch = make_batch(model.tokenizer, RECORDS[:2], chunks=[1, 2])  # one <audio> each, 1 and 2 chunks
    # encoder, frozen (forward only), 3 chunks: 3000 log-mel frames -> conv1 (k 3) -> conv2 (k 3, stride 2) ->
    # 1500 positions -> layers of q, k, v, o (d x d) and fc1, fc2 (d x ffn), attention over 1500 x 1500
    d, ffn, chunks = enc.d_model, enc.encoder_ffn_dim, 3
    encoder = (2 * enc.num_mel_bins * 3 * d * 3000 * chunks + 2 * d * 3 * d * 1500 * chunks
               + 2 * enc.encoder_layers * (4 * d * d + 2 * d * ffn) * 1500 * chunks
               + 4 * enc.encoder_layers * d * 1500 * 1500 * chunks)
    # projector d -> D -> D at every audio position; its first layer needs no input gradient
    D = llm.hidden_size
    first, second = 2 * d * D * 1500 * chunks, 2 * D * D * 1500 * chunks
    # LLM: text ids minus the <audio> placeholder plus 1500 positions per chunk
    T = [len(ids) - 1 + 1500 * n for ids, n in zip(batch["input_ids"], [1, 2])]
    heads, kv, hd = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    per_position = D * heads * hd + 2 * D * kv * hd + heads * hd * D + 3 * D * llm.intermediate_size
    linear = 2 * llm.num_hidden_layers * per_position * sum(T)
    attention = 4 * llm.num_hidden_layers * heads * hd * sum(t * t for t in T)
    supervised = sum(int((labels != M.IGNORE).sum()) for labels in batch["labels"])
    head = 2 * len(model.tokenizer) * D * supervised
    # stage 1: the gradient goes through the frozen LLM to the projector (input gradients, dQ/dK/dV), no LLM
    # weight gradients; stage 2 adds them
    stage1 = encoder + 2 * first + 3 * second + 2 * linear + 3 * attention + 2 * head
    stage2 = encoder + 2 * first + 3 * second + 3 * linear + 3 * attention + 3 * head
    assert align.batch_flops(model, batch, train_llm=False) == stage1
    assert align.batch_flops(stage_model(make_tiny, 2), batch, train_llm=True) == stage2


@pytest.mark.parametrize("case", ["stage 1", "stage 2", "--train-encoder", "--stack 5 --trim-audio"])
def test_batch_flops_equals_what_pytorch_counts_in_forward_and_backward(make_tiny, case):
    """torch's FlopCounterMode counts every matmul and convolution autograd runs (attention on the math kernel,
    so it is seen as matmuls): one record, no padding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    audio = dict(stack=5, trim_audio=True) if "stack" in case else {}
    model = stage_model(make_tiny, 1 if case == "stage 1" else 2, case == "--train-encoder", **audio)
    batch = make_batch(model.tokenizer, RECORDS[:1], chunks=[1])
    batch["audio_frames"] = torch.tensor([1234])
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(batch).backward()
    assert align.batch_flops(model, batch, train_llm=case != "stage 1") == counter.get_total_flops()


def test_gpu_peaks_by_device_name():
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989, "NVIDIA H800": 989, "NVIDIA H800 PCIe": 756,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-PCIE-40GB": 312, "NVIDIA A100 80GB PCIe": 312,
             "NVIDIA A800-SXM4-80GB": 312, "NVIDIA L40S": 362, "NVIDIA L40": 0, "NVIDIA GeForce RTX 4090": 0,
             "Tesla V100-SXM2-32GB": 0}
    assert {name: align.gpu_peak_tflops(name) for name in names} == names
    assert align.peak_flops(align.Config(peak_tflops=500)) == 500e12
