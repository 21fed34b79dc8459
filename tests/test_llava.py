"""Loading the released LLaSO-Base checkpoint (the reference's LLaVA layout), on a synthetic tiny copy."""

import json

import pytest
import torch
from safetensors.torch import save_file

import instruct
import model as M
from conftest import SAMPLE
from test_model import RECORDS, full_logits, make_batch, sharpen


def reference_layout(model) -> dict:
    """Our tensors under the names the reference's module tree gives them."""
    tensors = {k: v for k, v in model.llm.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    tensors.update({M.LLAVA_PROJECTOR + k: v.to(torch.bfloat16) for k, v in model.projector.state_dict().items()})
    tensors.update({"model.audio_tower.audio_tower." + k: v for k, v in model.encoder.state_dict().items()})
    return {k: v.clone().contiguous() for k, v in tensors.items()}


def write_checkpoint(model, folder, tensors):
    """Two shards + index + a llava_llama config naming an absolute Whisper path that does not exist here."""
    folder.mkdir()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.llm.config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], tokenizer_model_max_length=2048,
                  mm_audio_tower="/data/whisper-large-v3", mm_projector_type="mlp2x_gelu", mm_use_audio_start_end=True)
    (folder / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(folder)


@pytest.fixture
def released(make_tiny, tmp_path):
    model = sharpen(make_tiny(seed=7), seed=7)
    with torch.no_grad():  # a "trained" encoder, so taking the encoder weights from the checkpoint is visible
        model.encoder.layers[0].fc1.weight.mul_(1.5)
    return model, reference_layout(model)


def test_every_released_tensor_lands_where_it_should(released, tmp_path, tiny_config):
    model, tensors = released
    write_checkpoint(model, tmp_path / "LLaSO-Base", tensors)
    loaded = M.LLaSO.load(tmp_path / "LLaSO-Base", encoder=tiny_config.encoder)
    for part in ["llm", "encoder"]:
        want, got = getattr(model, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    for k, v in loaded.projector.state_dict().items():  # stored in bf16, as the reference saves it
        assert torch.equal(v, tensors[M.LLAVA_PROJECTOR + k].float())
    assert len(loaded.tokenizer) == len(model.tokenizer)

    model.projector.load_state_dict(loaded.projector.state_dict())  # the same bf16-rounded projector
    batch = make_batch(model.tokenizer, RECORDS[:3], chunks=[1, 2, 1])
    torch.testing.assert_close(full_logits(loaded, batch)[0], full_logits(model, batch)[0], rtol=0, atol=0)
    gen = make_batch(model.tokenizer, RECORDS[:2], chunks=[1, 1], answers=False)
    assert loaded.generate_ids(gen, 8) == model.generate_ids(gen, 8)


def test_conversion_to_a_stage2_artifact(released, tmp_path, tiny_config):
    model, tensors = released
    write_checkpoint(model, tmp_path / "LLaSO-Base", tensors)
    converted = tmp_path / "converted"
    M.LLaSO.load(tmp_path / "LLaSO-Base", encoder=tiny_config.encoder).save(converted, with_llm=True)
    direct = M.LLaSO.load(tmp_path / "LLaSO-Base", encoder=tiny_config.encoder)
    assert (converted / "encoder" / "model.safetensors").exists()  # the checkpoint's encoder weights travel along
    again = M.LLaSO.load(converted)  # self-contained: encoder (from the checkpoint), LLM, tokenizer, projector
    batch = make_batch(model.tokenizer, RECORDS[:2], chunks=[1, 1])
    torch.testing.assert_close(full_logits(again, batch)[0], full_logits(direct, batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_checkpoint_that_does_not_fit_names_the_tensor(released, tmp_path, tiny_config, change):
    model, tensors = released
    if change == "missing":
        name = "model.layers.1.mlp.down_proj.weight"
        del tensors[name]
    elif change == "extra":
        name = "model.mm_audio_aligner.projector.4.weight"
        tensors[name] = torch.zeros(3, 3)
    else:
        name = M.LLAVA_PROJECTOR + "2.bias"
        tensors[name] = torch.zeros(7)
    write_checkpoint(model, tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        M.LLaSO.load(tmp_path / "bad", encoder=tiny_config.encoder)


def test_instruct_continues_fine_tuning_from_the_released_checkpoint(released, tmp_path, tiny_config):
    """instruct.py --init starts from the released weights: after one step at LR 0 (warm-up) the stage-2 artifact
    it writes is exactly the released model, not the base LLM + a fresh projector."""
    model, tensors = released
    write_checkpoint(model, tmp_path / "LLaSO-Base", tensors)
    out = tmp_path / "finetune"
    instruct.main(["--preset", "tiny", "--init", str(tmp_path / "LLaSO-Base"), "--encoder", tiny_config.encoder,
                   "--llm", tiny_config.llm, "--data", str(SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json"),
                   "--audio-root", str(SAMPLE / "audio"), "--out", str(out), "--workers", "0", "--batch-size", "1",
                   "--grad-accum", "1", "--max-steps", "1"])
    direct = M.LLaSO.load(tmp_path / "LLaSO-Base", encoder=tiny_config.encoder)
    result = M.LLaSO.load(out)
    for part in ["llm", "encoder", "projector"]:
        want, got = getattr(direct, part).state_dict(), getattr(result, part).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), part
