"""bench.py gpu runs on CPU with the tiny preset, so it cannot rot between GPU runs: every field of its JSON, values
that agree with the training logs they come from, identical answers at batch 1 and batched."""

import json
import statistics

import pytest
import torch

import align
import bench
import model as M

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training: see conftest.one_thread


@pytest.fixture
def gpu_bench(tiny_config, tmp_path, monkeypatch):
    presets = []
    monkeypatch.setattr(M, "preset", lambda name: presets.append(name) or tiny_config)  # the session's tiny models
    work, path, threads = tmp_path / "work", tmp_path / "gpu.json", torch.get_num_threads()
    try:
        bench.main(["gpu", "--quick", "--eval-batch", "4", "--eval-workers", "0", "--threads", "1",
                    "--workdir", str(work), "--gpu-json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return presets, work, json.loads(path.read_text())


def test_gpu_bench_on_cpu_writes_every_field_from_the_real_runs(gpu_bench):
    presets, work, result = gpu_bench
    assert presets == ["tiny"]  # the CPU default
    assert set(result) == {"device", "preset", "torch", "grad_accum", "steps", "stage1", "stage2", "eval", "preset_s",
                           "wall_s"}
    assert (result["device"], result["preset"], result["steps"]) == ("cpu", "tiny", 3)
    assert 0 <= result["preset_s"] < result["wall_s"]
    for stage, micro_batch in [("stage1", 2), ("stage2", 1)]:
        r = result[stage]
        assert set(r) >= {"micro_batch", "steps_timed", "step_s", "tokens_per_s", "mfu", "peak_gib"}
        assert r["micro_batch"] == micro_batch and r["mfu"] is None and r["peak_gib"] is None  # CUDA only
        lines = [json.loads(line) for line in (work / stage / "log.jsonl").read_text().splitlines()]
        assert len(lines) == 3 and r["steps_timed"] == 2  # the first step is warm-up
        for key in ("step_s", "tokens_per_s"):
            assert r[key] == statistics.median(line[key] for line in lines[1:]) > 0
        for line in lines:  # LLM positions of a step: at least 1500 per record (one 30 s chunk each)
            assert line["tokens_per_s"] * line["step_s"] >= 1500 * micro_batch * result["grad_accum"]
        assert not align.checkpoints(work / stage) and (work / stage / "llaso_config.json").exists()
    assert result["stage2"]["activation_checkpointing"] is True
    evaluation = result["eval"]
    assert set(evaluation) == {"records", "new_tokens", "batch_1", "batch_4", "identical", "new_tokens_per_record"}
    assert evaluation["identical"] == evaluation["records"] == 4
    assert 0 < evaluation["new_tokens_per_record"] <= evaluation["new_tokens"] == 16
    for batch in ("batch_1", "batch_4"):
        assert evaluation[batch]["records_per_s"] > 0 and evaluation[batch]["peak_gib"] is None
    assert align.save_checkpoint.__name__ == "save_checkpoint"  # the bench's no-op stood in only while it ran
