"""Fewer audio tokens (--stack K, --trim-audio) and the unfrozen encoder (--train-encoder): the defaults are the old
computation bit for bit, trimmed audio is batch-independent, the options travel with the artifacts, refusals are
clear, resume is exact, and stage 2 still memorises four clips. CPU, tiny models."""

import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SAMPLE
from safetensors.torch import load_file
from test_llava import reference_layout, write_checkpoint
from test_model import RECORDS, make_batch, sharpen
from test_train import ALIGN, STAGE1_ARGS, flags, log, losses, torchrun, write_corpus
from transformers import WhisperFeatureExtractor

import align
import data as D
import evaluate as ev
import instruct
import model as M

TOKENS = ["--stack", 5, "--trim-audio"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tiny_config, seed=0, **options) -> M.LLaSO:
    torch.manual_seed(seed)
    return M.LLaSO.from_parts(dataclasses.replace(tiny_config, **options))


def sample_batch(model, indices, eval_mode=False):
    corpus = D.Corpus([SAMPLE / "LLaSO-Instruct/merged/stage2_train.json"])
    dataset = D.LLaSODataset(corpus, model.tokenizer, model.features, SAMPLE / "audio", eval_mode=eval_mode)
    return D.collate([dataset[i] for i in indices])


# ----------------------------------------------------------------------------------------------------------
# The default model is LLaSO's, computed exactly as before these options existed


def old_loss(model, batch):
    """LLaSO.forward as it was written before --stack / --trim-audio: 1500 positions per chunk, flatten + split."""
    with torch.no_grad():
        hidden = model.encoder(batch["mels"]).last_hidden_state
    audio = model.projector(hidden)
    embed = model.llm.get_input_embeddings()
    slots = list(audio.flatten(0, 1).split([n * 1500 for n in batch["audio_chunks"].tolist()]))
    rows, row_labels = [], []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        text, pieces, piece_labels, start = embed(ids.clamp(min=0)), [], [], 0
        for pos in (ids == M.AUDIO_ID).nonzero().flatten().tolist():
            slot = slots.pop(0)
            pieces += [text[start:pos], slot]
            piece_labels += [labels[start:pos], labels.new_full((len(slot),), M.IGNORE)]
            start = pos + 1
        rows.append(torch.cat(pieces + [text[start:]]))
        row_labels.append(torch.cat(piece_labels + [labels[start:]]))
    embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    labels = nn.utils.rnn.pad_sequence(row_labels, batch_first=True, padding_value=M.IGNORE)
    lengths = torch.tensor([len(r) for r in rows])
    arange = torch.arange(embeds.shape[1])
    targets = labels[:, 1:]
    keep = (targets != M.IGNORE).any(0).nonzero().flatten()
    logits = model.llm(inputs_embeds=embeds, attention_mask=(arange < lengths[:, None]).long(),
                       position_ids=arange.expand(len(rows), -1), logits_to_keep=keep).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=M.IGNORE), audio


def test_default_is_the_old_computation_bit_for_bit(tiny_config):
    assert (M.ModelConfig().stack, M.ModelConfig().trim_audio) == (1, False)
    model = tiny(tiny_config)
    batch = make_batch(model.tokenizer, RECORDS[:3], chunks=[1, 2, 1])
    want, want_audio = old_loss(model, batch)
    assert torch.equal(model.encode_audio(batch["mels"]), want_audio)
    assert torch.equal(model(batch), want)
    batch["audio_frames"] = torch.tensor([5] * 4)  # ignored unless the model trims
    assert torch.equal(model(batch), want)
    assert model.projector[0].in_features == model.encoder.config.d_model
    assert align.llm_positions(model, batch) == [len(ids) - 1 + 1500 * n for ids, n in
                                                 zip(batch["input_ids"], [1, 2, 1])]


def test_the_released_checkpoint_is_stack_1_untrimmed(make_tiny, tiny_config, tmp_path):
    model = make_tiny(seed=7)
    write_checkpoint(model, tmp_path / "LLaSO-Base", reference_layout(model))
    assert M.saved_audio_options(tmp_path / "LLaSO-Base") == (1, False)
    loaded = M.LLaSO.load(tmp_path / "LLaSO-Base", encoder=tiny_config.encoder)
    assert (loaded.config.stack, loaded.config.trim_audio) == (1, False)
    with pytest.raises(SystemExit, match="LLaSO-Base was trained with --stack 1 \\(its .*asks for --stack 5"):
        align.audio_options(align.Config(init=str(tmp_path / "LLaSO-Base"), stack=5))


# ----------------------------------------------------------------------------------------------------------
# The pieces: Whisper at any length, stacking, real frames


def test_whisper_forward_is_transformers_encoder_and_runs_at_any_length(tiny_config):
    encoder, _ = M.load_encoder(tiny_config.encoder)
    assert (encoder.config.max_source_positions, encoder.config.num_mel_bins) == (1500, 128)  # large-v3's interface
    mels = torch.randn(3, 128, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(M.whisper_forward(encoder, mels), encoder(mels).last_hidden_state)
        with pytest.raises(ValueError, match="expects the mel input features to be of length 3000"):
            encoder(mels[:, :, :400])  # why whisper_forward exists
        short = M.whisper_forward(encoder, mels[:, :, :401])
    assert short.shape == (3, 201, encoder.config.d_model)
    assert not torch.allclose(short, encoder(mels).last_hidden_state[:, :201], atol=1e-3)  # features differ


def test_stacking_puts_k_consecutive_frames_side_by_side():
    hidden = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    stacked = M.stack_frames(hidden, 3)
    assert stacked.shape == (2, 3, 9)
    assert torch.equal(stacked[1, 1], hidden[1, 3:6].flatten())
    assert torch.equal(stacked[0, 2], torch.cat([hidden[0, 6], torch.zeros(6)]))  # last group padded with zeros
    assert M.stack_frames(hidden, 1) is hidden
    assert [M.audio_positions(f, k) for f, k in [(3000, 1), (3000, 5), (3000, 7), (3000, 8), (258, 5), (1, 5)]] \
        == [1500, 300, 215, 188, 26, 1]


def test_real_frames_come_with_every_batch(tmp_path, tiny_config):
    features = WhisperFeatureExtractor.from_pretrained(tiny_config.encoder)
    x = np.random.default_rng(0).standard_normal(480_000 + 1_000).astype(np.float32) * 0.1
    sf.write(tmp_path / "long.wav", x, 16_000)
    clip = sorted((SAMPLE / "audio").rglob("*.wav"))[0]
    mels, chunks, frames, _ = D.audio_features([str(tmp_path / "long.wav"), str(clip)], features)
    assert chunks == [2, 1] and mels.shape[0] == 3
    assert frames == [3000, 7, math.ceil(len(sf.read(clip)[0]) / 160)]  # 1,000 samples: 7 hops of 160
    trimmed = tiny(tiny_config, trim_audio=True)
    batch = sample_batch(trimmed, [0, 1, 2])
    voices = [D.resolve_audio(SAMPLE / "audio", r["voice"][0]) for r in batch["records"]]
    assert batch["audio_frames"].tolist() == [math.ceil(len(D.load_audio(v)) / 160) for v in voices]
    del batch["audio_frames"]
    with pytest.raises(ValueError, match="needs \"audio_frames\""):
        trimmed(batch)


# ----------------------------------------------------------------------------------------------------------
# Trimmed, stacked audio: what reaches the LLM, and that it does not depend on the batch


@pytest.mark.parametrize("stack, trim", [(5, False), (1, True), (5, True), (7, True)])
def test_llm_positions_are_what_splice_builds(tiny_config, stack, trim):
    model = tiny(tiny_config, stack=stack, trim_audio=trim)
    assert model.projector[0].in_features == stack * model.encoder.config.d_model
    batch = sample_batch(model, [0, 5, 9])
    with torch.no_grad():
        embeds, attention, labels, _ = model.splice(batch, model.encode_audio(batch["mels"], model.real_frames(batch)))
    want = [M.audio_positions(f if trim else 3000, stack) for f in batch["audio_frames"].tolist()]
    assert model.chunk_positions(batch) == want
    assert attention.sum(1).tolist() == align.llm_positions(model, batch) == [
        len(ids) - 1 + n for ids, n in zip(batch["input_ids"], want)]
    assert [int((row == M.IGNORE).sum()) for row in labels] != [0, 0, 0]


def test_trimmed_audio_embeddings_do_not_depend_on_the_batch(tiny_config):
    model = tiny(tiny_config, stack=5, trim_audio=True)
    frames = [3000, 257, 800, 257, 1, 2999]
    mels = torch.randn(len(frames), 128, 3000, generator=torch.Generator().manual_seed(0))
    batch = {"mels": mels, "audio_frames": torch.tensor(frames)}
    with torch.no_grad():
        together = model.encode_audio(mels, frames)
        sizes = model.chunk_positions(batch)
        assert together.shape[1] == max(sizes) == 300
        for i, f in enumerate(frames):
            alone = model.encode_audio(mels[i: i + 1], [f])
            assert alone.shape[1] == sizes[i] and torch.equal(alone[0], together[i, : sizes[i]])
            # only the real frames matter: whatever the padding holds
            noisy = mels[i: i + 1].clone()
            noisy[:, :, f:] = 7.0
            assert torch.equal(model.encode_audio(noisy, [f]), alone)


def test_trimmed_batched_generation_equals_per_record(tiny_config):
    model = sharpen(tiny(tiny_config, stack=5, trim_audio=True)).eval()
    indices = [0, 3, 17, 40, 41, 90]
    batch = sample_batch(model, indices, eval_mode=True)
    together = model.generate_ids(batch, max_new_tokens=12)
    alone = [model.generate_ids(sample_batch(model, [i], eval_mode=True), max_new_tokens=12)[0] for i in indices]
    assert together == alone
    assert len({tuple(a) for a in alone}) > 1


def test_flops_count_the_positions_that_run(tiny_config):
    padded, trimmed, stacked = (tiny(tiny_config, **o) for o in [{}, {"trim_audio": True},
                                                                 {"trim_audio": True, "stack": 5}])
    batch = sample_batch(padded, [0, 1])
    full = dict(batch, audio_frames=torch.tensor([3000, 3000]))  # trimming 30 s chunks changes nothing
    assert align.batch_flops(trimmed, full, True) == align.batch_flops(padded, batch, True)
    assert align.batch_flops(stacked, batch, True) < align.batch_flops(trimmed, batch, True) \
        < align.batch_flops(padded, batch, True) / 5
    for module in align.trainable_encoder(padded):
        module.requires_grad_(True)
    assert align.batch_flops(padded, batch, True) > align.batch_flops(trimmed, full, True)  # its backward counts


# ----------------------------------------------------------------------------------------------------------
# Artifacts carry the options


def test_options_are_saved_and_loaded_with_the_artifact(tiny_config, tmp_path):
    model = sharpen(tiny(tiny_config, seed=3, stack=5, trim_audio=True))
    batch = sample_batch(model, [0, 7])
    with torch.no_grad():
        want = model(batch)
    for stage, with_llm in [(1, False), (2, True)]:
        model.save(tmp_path / f"s{stage}", with_llm=with_llm)
        saved = json.loads((tmp_path / f"s{stage}" / "llaso_config.json").read_text())
        assert (saved["stack"], saved["trim_audio"]) == (5, True)
        assert M.saved_audio_options(tmp_path / f"s{stage}") == (5, True)
        assert M.saved_audio_options(tmp_path / f"s{stage}" / "projector.safetensors") == (5, True)
    loaded = M.LLaSO.load(tmp_path / "s2")
    assert (loaded.config.stack, loaded.config.trim_audio) == (5, True)
    with torch.no_grad():
        assert torch.equal(loaded(batch), want)
    # an artifact written before these options existed is LLaSO's model
    old = json.loads((tmp_path / "s1" / "llaso_config.json").read_text())
    del old["stack"], old["trim_audio"]
    (tmp_path / "s1" / "llaso_config.json").write_text(json.dumps(old))
    assert M.saved_audio_options(tmp_path / "s1") == (1, False)
    with pytest.raises(ValueError, match="takes 320 inputs per position \\(5 stacked 64-wide encoder frames\\); "
                                         "this model stacks 1 \\(--stack 5 fits it\\)"):
        M.LLaSO.load(tmp_path / "s1")
    assert M.saved_audio_options(tmp_path / "nowhere" / "projector.safetensors") is None


# ----------------------------------------------------------------------------------------------------------
# Through the command lines: stage 1 with the options, stage 2 takes them from it, evaluation, --init


@pytest.fixture(scope="module")
def stage1_tokens(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1-tokens")
    corpus = write_corpus(root / "data", ALIGN[:4])
    out = root / "out"
    align.main(flags(tiny_dir, corpus, out, *STAGE1_ARGS, *TOKENS))
    return corpus, out


def test_stage1_artifact_records_the_options_and_resume_is_exact(stage1_tokens, tiny_dir, tmp_path):
    corpus, full = stage1_tokens
    saved = json.loads((full / "llaso_config.json").read_text())
    assert (saved["stack"], saved["trim_audio"]) == (5, True)
    assert not (full / "mm_audio_aligner.bin").exists()  # the reference could only feed it 1500 padded frames
    assert load_file(full / "projector.safetensors")["0.weight"].shape == (64, 5 * 64)
    out = tmp_path / "out"
    args = flags(tiny_dir, corpus, out, *STAGE1_ARGS, *TOKENS)
    align.main(args + ["--stop-after", "1"])
    align.main(args + ["--resume"])
    assert losses(out) == losses(full) and len(losses(out)) == 4
    want, got = load_file(full / "projector.safetensors"), load_file(out / "projector.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_align_refuses_train_encoder(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="--train-encoder is a stage-2 option \\(instruct.py\\)"):
        align.main(flags(tiny_dir, "unused.json", tmp_path, "--train-encoder"))


def test_stage2_refuses_flags_that_contradict_its_stage1_artifact(stage1_tokens, tiny_dir, tmp_path):
    corpus, stage1 = stage1_tokens
    for extra in [["--stack", 1], ["--stack", 4, "--trim-audio"]]:
        with pytest.raises(SystemExit, match="was trained with --stack 5 --trim-audio \\(its llaso_config.json\\), "
                                             "but this run asks for --stack [14]"):
            instruct.main(flags(tiny_dir, corpus, tmp_path / "x", "--projector", stage1, *extra))
    assert not (tmp_path / "x" / "log.jsonl").exists()
    cfg = align.Config(projector=str(stage1), stack=5, trim_audio=True)  # saying it again is fine
    assert align.audio_options(cfg) == (5, True)
    assert align.audio_options(align.Config(projector=str(stage1))) == (5, True)
    bare = tmp_path / "bare" / "projector.safetensors"  # a projector file without its llaso_config.json
    bare.parent.mkdir()
    bare.write_bytes((stage1 / "projector.safetensors").read_bytes())
    assert align.audio_options(align.Config(projector=str(bare), stack=5, trim_audio=True)) == (5, True)
    with pytest.raises(SystemExit, match="stacks 1 \\(--stack 5 fits it\\)"):  # the flags were needed
        instruct.main(flags(tiny_dir, corpus, tmp_path / "y", "--projector", bare))


def memorise_records():
    # Four short sentences, four voices, the same instruction: only the audio tells which answer is wanted.
    clips = [ALIGN[i] for i in (21, 23, 7, 12)]
    return [dict(r, conversations=[{"from": "human", "value": "Please transcribe the audio.<audio>"},
                                   r["conversations"][1]]) for r in clips]


@pytest.fixture(scope="module")
def memorised_tokens(stage1_tokens, tiny_dir, tmp_path_factory):
    """test_train's memorisation run, from the --stack 5 --trim-audio stage-1 artifact (no flags repeated)."""
    records = memorise_records()
    root = tmp_path_factory.mktemp("memorise-tokens")
    corpus = write_corpus(root / "data", records)
    out = root / "out"
    instruct.main(flags(tiny_dir, corpus, out, "--batch-size", 1, "--grad-accum", 1, "--epochs", 75, "--lr", 3e-3,
                        "--save-every", 1000, "--projector", stage1_tokens[1]))
    return records, out


def test_stage2_with_fewer_tokens_memorises_four_clips_and_evaluates_them(memorised_tokens, tmp_path):
    records, out = memorised_tokens
    saved = json.loads((out / "llaso_config.json").read_text())
    assert (saved["stack"], saved["trim_audio"]) == (5, True)  # taken from the stage-1 artifact
    assert json.loads((out / "ckpt-0000300" / "config.json").read_text())["stack"] == 5
    assert sum(r["loss"] for r in log(out)[-4:]) / 4 < 0.07  # as in test_train's memorisation test
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "memorise_test.json").write_text(json.dumps(records))
    ev.main(["--ckpt", str(out), "--data", str(tmp_path / "data"), "--audio-root", str(SAMPLE / "audio"),
             "--out", str(tmp_path / "results"), "--max-new-tokens", "32", "--workers", "0"])
    results = json.loads((tmp_path / "results" / "memorise_test.json").read_text())
    assert [r["answer"] for r in results] == [r["conversations"][1]["value"] for r in records]
    model = ev.load_model(out)  # one-off inference gets the audio's real length too
    wav = D.resolve_audio(SAMPLE / "audio", records[2]["voice"][0])
    assert ev.answer_one(model, "Please transcribe the audio.", [wav], 32) == records[2]["conversations"][1]["value"]


def test_init_takes_the_options_from_its_artifact(memorised_tokens, tiny_dir, tmp_path):
    records, trained = memorised_tokens
    corpus = str(trained.parent / "data" / "train.json")
    with pytest.raises(SystemExit, match="was trained with --stack 5 --trim-audio"):
        instruct.main(flags(tiny_dir, corpus, tmp_path / "x", "--init", trained, "--stack", 2))
    out = tmp_path / "finetune"
    model = instruct.main(flags(tiny_dir, corpus, out, "--init", trained, "--batch-size", 1, "--grad-accum", 1,
                                "--max-steps", 1, "--lr", 1e-5))
    assert (model.config.stack, model.config.trim_audio) == (5, True)
    saved = json.loads((out / "llaso_config.json").read_text())
    assert (saved["stack"], saved["trim_audio"]) == (5, True)
    assert log(out)[0]["loss"] < 0.2  # it starts from the memorised model, so the options were read back


# ----------------------------------------------------------------------------------------------------------
# --train-encoder (stage 2 only)


def test_train_encoder_gives_the_encoder_gradients_in_both_forwards(tiny_config):
    for trim in (False, True):
        model = tiny(tiny_config, trim_audio=trim)
        for module in align.trainable_encoder(model):
            module.requires_grad_(True)
        model(sample_batch(model, [0, 1])).backward()
        grads = {n: p.grad for n, p in model.encoder.named_parameters()}
        assert grads.pop("embed_positions.weight") is None  # Whisper's fixed sinusoids stay fixed
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), trim


TRAIN_ENCODER = ["--batch-size", 1, "--max-steps", 3, "--lr", 1e-2, "--warmup-ratio", 0, "--save-every", 1,
                 "--keep", 5, "--train-encoder"]


@pytest.fixture(scope="module")
def encoder_trained(stage1_tokens, tiny_dir, tmp_path_factory):
    corpus, stage1 = stage1_tokens
    out = tmp_path_factory.mktemp("train-encoder") / "out"
    model = instruct.main(flags(tiny_dir, corpus, out, *TRAIN_ENCODER, "--grad-accum", 2, "--projector", stage1))
    return out, model


def test_train_encoder_trains_it_in_fp32_and_the_artifact_carries_it(encoder_trained, tiny_config):
    out, trained = encoder_trained
    fresh = tiny(tiny_config)
    changed = {k for k, v in trained.encoder.state_dict().items() if not torch.equal(v, fresh.encoder.state_dict()[k])}
    assert changed == set(fresh.encoder.state_dict()) - {"embed_positions.weight"}
    assert all(p.dtype == torch.float32 for p in trained.encoder.parameters())
    keys = set(load_file(out / "ckpt-0000003" / "trainable.safetensors"))
    assert {"encoder." + k for k in changed} <= keys and "encoder.embed_positions.weight" not in keys
    optimizer = torch.load(out / "ckpt-0000003" / "optimizer.pt", weights_only=False)
    assert {"encoder." + k for k in changed} <= set(optimizer["state"])
    assert json.loads((out / "llaso_config.json").read_text())["encoder"] == "encoder"
    loaded = M.LLaSO.load(out)
    assert loaded.config.encoder == str(out / "encoder")
    assert all(torch.equal(v, trained.encoder.state_dict()[k]) for k, v in loaded.encoder.state_dict().items())


def test_train_encoder_resume_is_exact(encoder_trained, stage1_tokens, tiny_dir, tmp_path):
    full, _ = encoder_trained
    corpus, stage1 = stage1_tokens
    out = tmp_path / "out"
    args = flags(tiny_dir, corpus, out, *TRAIN_ENCODER, "--grad-accum", 2, "--projector", stage1)
    instruct.main(args + ["--stop-after", "1"])
    instruct.main(args + ["--resume"])
    assert losses(out) == losses(full) and len(losses(out)) == 3
    want, got = load_file(full / "encoder" / "model.safetensors"), load_file(out / "encoder" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_train_encoder_under_fsdp_equals_one_process(encoder_trained, stage1_tokens, tiny_dir, tmp_path):
    full, one = encoder_trained
    corpus, stage1 = stage1_tokens
    out = tmp_path / "fsdp"
    # 2 ranks x accumulation 1 = one process x accumulation 2
    torchrun("instruct.py", flags(tiny_dir, corpus, out, *TRAIN_ENCODER, "--grad-accum", 1, "--projector", stage1,
                                  "--fsdp"))
    assert losses(out) == pytest.approx(losses(full), rel=1e-4)
    sharded = M.LLaSO.load(out)
    for (name, p), q in zip(sharded.encoder.named_parameters(), one.encoder.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
