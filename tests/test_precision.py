"""--precision bf16 on a CPU: the GPU's policy (frozen parts bf16; trainable weights and AdamW state fp32, computed
under bf16 autocast; FSDP2 gathers in bf16 and reduces in fp32) through stage 1, stage 2, 2-rank FSDP2 and
evaluation. And TF32, off by default. Tiny models, a few records, two steps each."""

import glob
import json

import pytest
import torch
from conftest import SAMPLE
from safetensors.torch import load_file
from test_train import ALIGN, flags, log, losses, torchrun, write_corpus

import align
import evaluate as ev
import instruct
import model as M

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread

STAGE1 = ["--batch-size", 1, "--grad-accum", 2, "--max-steps", 2, "--save-every", 1, "--lr", 1e-2,
          "--warmup-ratio", 0, "--precision", "bf16"]
STAGE2 = ["--batch-size", 1, "--max-steps", 1, "--lr", 1e-3, "--warmup-ratio", 0, "--save-every", 10,
          "--precision", "bf16"]


def run_seeing_autocast(run) -> tuple:
    """run()'s result, and what every LLaSO.forward in it ran under: {(autocast on?, its dtype, LLM weight dtype)}."""
    seen, forward = set(), M.LLaSO.forward

    def spy(self, batch):
        seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                  self.llm.get_input_embeddings().weight.dtype))
        return forward(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(M.LLaSO, "forward", spy)
        return run(), seen


def assert_fp32_master_weights(tensors: dict):
    """fp32, and trained in fp32: values that bf16 cannot hold (a bf16 update would have rounded them)."""
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert all(not torch.equal(v, v.bfloat16().float()) for v in tensors.values() if v.numel() > 1)


def assert_fp32_adam_state(ckpt):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert state and {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.float32}


def llm_weights(out) -> dict:
    return {k: v for f in sorted(glob.glob(str(out / "llm" / "*.safetensors"))) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def stage1_bf16(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-stage1")
    corpus, out = write_corpus(root / "data", ALIGN[:4]), root / "out"
    model, seen = run_seeing_autocast(lambda: align.main(flags(tiny_dir, corpus, out, *STAGE1)))
    return corpus, out, model, seen


def test_stage1_in_bf16_keeps_frozen_parts_bf16_and_trains_fp32_master_weights(stage1_bf16, tiny_dir):
    corpus, out, model, seen = stage1_bf16
    assert seen == {(True, torch.bfloat16, torch.bfloat16)}  # bf16 autocast, frozen LLM in bf16
    assert all(0 < r["loss"] < 20 for r in log(out)) and len(log(out)) == 2  # finite
    assert {p.dtype for p in model.llm.parameters()} == {p.dtype for p in model.encoder.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    assert {b.dtype for b in model.llm.buffers()} == {torch.float32}  # RoPE's inv_freq
    assert_fp32_master_weights(load_file(out / "projector.safetensors"))
    assert_fp32_master_weights(load_file(out / "ckpt-0000002" / "trainable.safetensors"))
    assert_fp32_adam_state(out / "ckpt-0000002")
    assert torch.load(out / "mm_audio_aligner.bin")["model.mm_audio_aligner.projector.0.weight"].dtype == torch.bfloat16
    # the precision changes the trajectory: --resume refuses another
    with pytest.raises(SystemExit, match="precision: bf16 -> fp32"):
        align.main(flags(tiny_dir, corpus, out, *STAGE1, "--precision", "fp32", "--resume"))


def test_stage1_loss_in_bf16_is_close_to_fp32(stage1_bf16, tiny_dir, tmp_path):
    corpus, out, _, _ = stage1_bf16
    _, seen = run_seeing_autocast(lambda: align.main(flags(tiny_dir, corpus, tmp_path, *STAGE1, "--max-steps", 1,
                                                            "--precision", "fp32")))
    assert seen == {(False, torch.bfloat16, torch.float32)}  # (bf16: the dtype autocast would use if it were on)
    fp32, bf16 = losses(tmp_path)[1], losses(out)[1]  # the first step: the same weights, before any update
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=1e-2)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: one process (accumulation 4), which computes what DDP does; 2-rank FSDP2 (accumulation 2) close to it


@pytest.fixture(scope="module")
def stage2_corpus(tmp_path_factory):
    records = json.loads((SAMPLE / "LLaSO-Instruct/merged/stage2_train.json").read_text())[::17][:8]
    return write_corpus(tmp_path_factory.mktemp("bf16-stage2") / "data", records)


@pytest.fixture(scope="module")
def stage2_bf16(stage1_bf16, stage2_corpus, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16-one") / "out"
    model, seen = run_seeing_autocast(lambda: instruct.main(flags(tiny_dir, stage2_corpus, out, *STAGE2,
                                                                  "--grad-accum", 4, "--projector", stage1_bf16[1])))
    return out, model, seen


def test_stage2_in_bf16_trains_fp32_master_weights_of_projector_and_llm(stage2_bf16):
    out, model, seen = stage2_bf16
    assert seen == {(True, torch.bfloat16, torch.float32)}
    assert 0 < log(out)[0]["loss"] < 20
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}  # frozen
    assert {p.dtype for p in model.llm.parameters()} == {p.dtype for p in model.projector.parameters()} == {
        torch.float32}
    assert_fp32_master_weights(llm_weights(out))
    assert_fp32_master_weights(load_file(out / "projector.safetensors"))
    assert_fp32_adam_state(out / "ckpt-0000001")


def test_fsdp2_in_bf16_is_close_to_ddp(stage2_bf16, stage1_bf16, stage2_corpus, tiny_dir, tiny_config, tmp_path):
    """One step of global batch 4. FSDP2's MixedPrecisionPolicy gathers every weight in bf16 (norms and embeddings
    too), where autocast casts only the matmuls' inputs: close, not equal. Its gradients are reduce-scattered at
    each of the 2 micro-batches and accumulate in the fp32 shards."""
    one = stage2_bf16[0]
    out = tmp_path / "fsdp"
    torchrun("instruct.py", flags(tiny_dir, stage2_corpus, out, *STAGE2, "--grad-accum", 2, "--fsdp",
                                  "--projector", stage1_bf16[1]))
    (a,), (b,) = log(out), log(one)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    fsdp, ddp = llm_weights(out), llm_weights(one)
    assert_fp32_master_weights(fsdp)
    start = M.LLaSO.from_parts(tiny_config).llm.state_dict()
    # AdamW's first step moves each weight by about lr; the two runs differ by a small fraction of that
    for name, w in ddp.items():
        moved, apart = (w - start[name]).abs().mean(), (fsdp[name] - w).abs().mean()
        assert apart < 0.02 * moved, name


def test_evaluation_in_bf16_on_cpu(stage2_bf16, tmp_path):
    out = stage2_bf16[0]
    test_file = SAMPLE / "LLaSO-Eval" / "text_audio" / "slurp_Intent_Prediction_test.json"
    ev.main(["--ckpt", str(out), "--data", str(test_file), "--audio-root", str(SAMPLE / "audio"),
             "--out", str(tmp_path), "--max-new-tokens", "4", "--workers", "0", "--precision", "bf16"])
    assert json.loads((tmp_path / ev.PARTIAL / "run.json").read_text())["dtype"] == "torch.bfloat16"
    answers = [r["answer"] for r in json.loads((tmp_path / test_file.name).read_text())]
    assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
    assert (tmp_path / "scores.json").exists()


# ----------------------------------------------------------------------------------------------------------
# Defaults and TF32


def test_precision_defaults_to_fp32_on_cpu_and_bf16_runs_under_cpu_autocast():
    assert align.set_up().precision == "fp32"
    env = align.set_up("bf16")
    assert env.precision == "bf16" and env.frozen_dtype == torch.bfloat16
    with env.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with align.set_up("fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.fixture
def tf32_flags():
    """PyTorch's own defaults (matmuls off, cuDNN on), restored after the test."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_tf32_is_off_by_default_and_tf32_turns_matmuls_on(tf32_flags):
    """Faithful to the reference's stated --tf32 False: no TF32 anywhere (torch's own default leaves cuDNN's on). Its
    train.py then sets torch.backends.cuda.matmul.allow_tf32 = True: --tf32 gives that, cuDNN convolutions still off."""
    cfg = align.parse_config(["--data", "x.json", "--audio-root", "."], stage=1)
    align.set_up(cfg.precision, cfg.tf32)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    cfg = align.parse_config(["--data", "x.json", "--audio-root", ".", "--tf32"], stage=1)
    align.set_up(cfg.precision, cfg.tf32)
    assert torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
