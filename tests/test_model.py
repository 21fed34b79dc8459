"""model.py: prompt bytes, splice, labels, frozen encoder, batch-invariant generation, checkpoints."""

import shutil
from collections import Counter

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import SAMPLE

import model as M


pytestmark = pytest.mark.usefixtures("one_thread")


SYS = M.SYSTEM_PROMPT
HEAD = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_system_prompt_is_the_reference_text():
    assert SYS.startswith("A chat between a curious user and an artificial intelligence assistant. ")
    assert "natural language.The audio content will be provided with the following format: " in SYS
    assert SYS.endswith("<Audio>audio content</Audio>.")


def test_prompt_bytes_text_then_audio():  # (t,a): instruction first
    got = M.prompt_text("  Please transcribe the audio.<audio> ", " Hello there. ")
    want = (HEAD + "Please transcribe the audio.\n<Audio><audio_start><audio><audio_end></Audio>\n\n"
            + ASSISTANT + "Hello there.<|eot_id|>")
    assert got == want


def test_prompt_bytes_audio_then_text():  # (a,t): spoken instruction, text input after it
    got = M.prompt_text("<audio>The fifth prime minister of australia", "Alfred Deakin.")
    want = (HEAD + "<Audio><audio_start><audio><audio_end></Audio>\nThe fifth prime minister of australia"
            + ASSISTANT + "Alfred Deakin.<|eot_id|>")
    assert got == want


def test_prompt_bytes_pure_audio_and_generation_prompt():  # (a): generic prompt, audio carries everything
    got = M.prompt_text("Listen to this audio carefully and share your answer.<audio>")
    want = (HEAD + "Listen to this audio carefully and share your answer.\n<Audio><audio_start><audio><audio_end>"
            "</Audio>\n\n" + ASSISTANT)
    assert got == want


def test_new_tokens_and_mean_init(make_tiny, tiny_dir):
    model = make_tiny()
    tok = model.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in M.NEW_TOKENS]
    base = M.AutoTokenizer.from_pretrained(tiny_dir / "llm")
    assert ids == list(range(len(base), len(base) + 5)) and tok.pad_token == "<unk>"
    weight = model.llm.get_input_embeddings().weight
    assert weight.shape[0] == len(tok)
    torch.testing.assert_close(weight[ids], weight[: len(base)].mean(0).expand(5, -1), rtol=0, atol=0)
    assert model.llm.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # tied, as Llama-3.2-3B


def test_tokenize_labels_and_placeholder(make_tiny):
    tok = make_tiny().tokenizer
    ids, labels = M.tokenize(tok, "Please transcribe the audio.<audio>", "Hello there.")
    whole = tok.encode(M.prompt_text("Please transcribe the audio.<audio>", "Hello there.").replace("<audio>", ""),
                       add_special_tokens=False)
    assert [i for i in ids if i != M.AUDIO_ID] == whole  # splitting at <audio> == tokenising the whole string
    assert ids.count(M.AUDIO_ID) == 1 and ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    answer = tok.encode("Hello there.<|eot_id|>", add_special_tokens=False)
    n = len(ids) - len(answer)
    assert labels[n:] == answer and ids[n:] == answer
    assert labels[:n] == [M.IGNORE] * n
    short, short_labels = M.tokenize(tok, "Please transcribe the audio.<audio>", "Hello there.", max_len=len(ids) - 2)
    assert short == ids[:-2] and short_labels == labels[:-2]  # the answer's tail is cut, as in the reference
    with pytest.raises(ValueError, match="cuts off an <audio>"):
        M.tokenize(tok, "Please transcribe the audio.<audio>", "Hello there.", max_len=20)
    gen_ids, gen_labels = M.tokenize(tok, "Please transcribe the audio.<audio>")
    assert gen_ids == M.tokenize(tok, "Please transcribe the audio.<audio>", "x")[0][: len(gen_ids)]
    assert set(gen_labels) == {M.IGNORE}


def make_batch(tok, records, chunks, seed=0, answers=True):
    """records: (human, answer); chunks: chunk count per record (one audio file each). Random mels."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = zip(*[M.tokenize(tok, h, a if answers else None) for h, a in records])
    return {"input_ids": [torch.tensor(i) for i in ids], "labels": [torch.tensor(x) for x in labels],
            "mels": torch.randn(sum(chunks), 128, 3000, generator=g), "audio_chunks": torch.tensor(chunks)}


RECORDS = [
    ("Please transcribe the audio.<audio>", "one two three"),
    ("<audio>What is the capital of France?", "Paris."),
    ("Listen to this audio carefully and share your answer.<audio>", "Male."),
    ("What is the gender of the speaker? Answer Male or Female.<audio>", "Female."),
    ("<audio>", "The quick brown fox jumps over the lazy dog."),
    ("Which accent does the speaker have? American, British, Scottish.<audio>", "Scottish."),
]


def test_splice_places_audio_exactly_and_supervises_only_answers(make_tiny):
    model = make_tiny()
    batch = make_batch(model.tokenizer, RECORDS[:3], chunks=[2, 1, 3])
    audio = torch.randn(6, 1500, model.llm.config.hidden_size)
    for left in (False, True):
        embeds, attention, labels, positions = model.splice(batch, audio, left_pad=left)
        table = model.llm.get_input_embeddings().weight
        chunk_start = 0
        for b, (ids, lab) in enumerate(zip(batch["input_ids"], batch["labels"])):
            n_audio = batch["audio_chunks"][b].item() * 1500
            length = len(ids) - 1 + n_audio
            pad = embeds.shape[1] - length
            row = slice(pad, None) if left else slice(0, length)
            e, l, p = embeds[b, row], labels[b, row], positions[b, row]
            slot = ids.tolist().index(M.AUDIO_ID)
            want_audio = audio[chunk_start: chunk_start + n_audio // 1500].flatten(0, 1)
            assert torch.equal(e[slot: slot + n_audio], want_audio)
            assert torch.equal(e[:slot], table[ids[:slot]]) and torch.equal(e[slot + n_audio:], table[ids[slot + 1:]])
            assert (l[slot: slot + n_audio] == M.IGNORE).all()
            assert torch.equal(torch.cat([l[:slot], l[slot + n_audio:]]), torch.cat([lab[:slot], lab[slot + 1:]]))
            assert torch.equal(p, torch.arange(length))
            assert attention[b, row].all()
            if pad:  # padding: no attention, no label, zero embedding
                pad_rows = slice(0, pad) if left else slice(length, None)
                assert not attention[b, pad_rows].any() and (labels[b, pad_rows] == M.IGNORE).all()
                assert (embeds[b, pad_rows] == 0).all()
            supervised = l[l != M.IGNORE].tolist()
            eot = model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
            answer = model.tokenizer.encode(RECORDS[b][1], add_special_tokens=False) + [eot]
            assert supervised == answer
            chunk_start += n_audio // 1500


def full_logits(model, batch):
    audio = model.encode_audio(batch["mels"])
    embeds, attention, labels, positions = model.splice(batch, audio)
    logits = model.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
    return logits, labels


def test_loss_equals_plain_cross_entropy_over_answer_tokens(make_tiny):
    model = make_tiny()
    batch = make_batch(model.tokenizer, RECORDS[:4], chunks=[1, 2, 1, 1])
    logits, labels = full_logits(model, batch)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=M.IGNORE)
    torch.testing.assert_close(model(batch), want, rtol=1e-6, atol=1e-6)


def test_text_only_path_equals_the_llm_on_token_ids(make_tiny):
    """Our embedding route gives the LLM's own logits for a prompt without audio."""
    model = make_tiny()
    ids, labels = M.tokenize(model.tokenizer, "What is the capital of France?", "Paris.")
    batch = {"input_ids": [torch.tensor(ids)], "labels": [torch.tensor(labels)],
             "mels": torch.zeros(0, 128, 3000), "audio_chunks": torch.zeros(0, dtype=torch.long)}
    ours, _ = full_logits(model, batch)
    theirs = model.llm(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_encoder_is_frozen_and_gets_no_gradient(make_tiny):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(model.tokenizer, RECORDS[:2], chunks=[1, 1])
    model(batch).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.projector[0].weight.grad.abs().sum() > 0  # gradient flows through the splice
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    assert not model.encoder.training


def sharpen(model, seed=0):
    """A random LLM with large weights: varied, input-dependent greedy outputs without near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_batched_greedy_equals_per_record_greedy(make_tiny):
    model = sharpen(make_tiny())
    model.eos_ids = model.eos_ids + [model.tokenizer.encode("e", add_special_tokens=False)[0]]  # stop early in some rows
    batch = make_batch(model.tokenizer, RECORDS, chunks=[1, 3, 2, 1, 2, 1], answers=False)
    together = model.generate_ids(batch, max_new_tokens=24)
    offsets = torch.cumsum(torch.tensor([0] + batch["audio_chunks"].tolist()), 0)
    alone = []
    for b in range(len(RECORDS)):
        one = {"input_ids": [batch["input_ids"][b]], "labels": [batch["labels"][b]],
               "mels": batch["mels"][offsets[b]: offsets[b + 1]], "audio_chunks": batch["audio_chunks"][b: b + 1]}
        alone.append(model.generate_ids(one, max_new_tokens=24)[0])
    assert together == alone
    assert len({tuple(a) for a in alone}) == len(alone)  # the outputs differ, so the comparison means something
    assert len({len(a) for a in alone}) > 1  # and rows stop at different steps (finished rows leave the batch)
    assert max(map(len, alone)) == 24 > min(map(len, alone))  # some row decodes on alone after others ended


def test_generation_matches_transformers_generate_on_text(make_tiny):
    """Our KV-cache loop against transformers' own greedy generate (the trusted implementation)."""
    model = sharpen(make_tiny())
    ids, labels = M.tokenize(model.tokenizer, "What is the capital of France?")
    batch = {"input_ids": [torch.tensor(ids)], "labels": [torch.tensor(labels)],
             "mels": torch.zeros(0, 128, 3000), "audio_chunks": torch.zeros(0, dtype=torch.long)}
    ours = model.generate_ids(batch, max_new_tokens=16)[0]
    theirs = model.llm.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                eos_token_id=model.eos_ids, pad_token_id=model.tokenizer.pad_token_id)
    theirs = theirs[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(theirs) if t in model.eos_ids), len(theirs))
    assert ours == theirs[:stop] and len(ours) > 0


def test_batched_generation_matches_transformers_generate_on_audio(make_tiny):
    """Our batched loop (left-padded static cache, rows leaving the batch) against transformers' own greedy generate
    of each record alone, from the same spliced embeddings, with its default growing cache."""
    model = sharpen(make_tiny())
    batch = make_batch(model.tokenizer, RECORDS, chunks=[1, 3, 2, 1, 2, 1], answers=False)
    free = model.generate_ids(batch, max_new_tokens=16)
    common = Counter(t for row in free for t in set(row)).most_common(1)[0][0]
    model.eos_ids = model.eos_ids + [common]  # a token most answers contain also ends a turn: rows end apart
    ours = model.generate_ids(batch, max_new_tokens=16)
    embeds, attention, _, _ = model.splice(batch, model.encode_audio(batch["mels"]))
    theirs = []
    for row, n in zip(embeds, attention.sum(1).tolist()):
        out = model.llm.generate(inputs_embeds=row[None, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, eos_token_id=model.eos_ids,
                                 pad_token_id=model.tokenizer.pad_token_id)[0].tolist()  # new tokens only
        theirs.append(out[: next((i for i, t in enumerate(out) if t in model.eos_ids), len(out))])
    assert ours == theirs
    assert len({len(t) for t in theirs}) > 1 and max(map(len, theirs)) == 16  # rows end at different steps


def test_save_load_round_trip_gives_identical_logits(make_tiny, tmp_path):
    model = sharpen(make_tiny(seed=3))
    batch = make_batch(model.tokenizer, RECORDS[:3], chunks=[1, 2, 1])
    want, _ = full_logits(model, batch)
    model.save(tmp_path / "stage2", with_llm=True)
    loaded = M.LLaSO.load(tmp_path / "stage2")
    torch.testing.assert_close(full_logits(loaded, batch)[0], want, rtol=0, atol=0)

    model = make_tiny(seed=4)  # stage 1: projector only, the LLM comes from the id in the config
    want, _ = full_logits(model, batch)
    model.save(tmp_path / "stage1", with_llm=False)
    assert sorted(p.name for p in (tmp_path / "stage1").iterdir()) == ["llaso_config.json", "projector.safetensors"]
    torch.testing.assert_close(full_logits(M.LLaSO.load(tmp_path / "stage1"), batch)[0], want, rtol=0, atol=0)


# openai/whisper-large-v3's weight files: fp16 model.safetensors (3 GB) and an fp32 variant in two shards (6 GB)
WHISPER_LARGE_V3_WEIGHTS = ["model.safetensors", "model.fp32-00001-of-00002.safetensors",
                            "model.fp32-00002-of-00002.safetensors", "model.safetensors.index.fp32.json"]


def test_whisper_weights_are_fetched_and_read_once_not_with_their_fp32_variant(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    fetched = []
    monkeypatch.setattr(M, "snapshot_download", lambda repo, allow_patterns: fetched.extend(
        filter_repo_objects(WHISPER_LARGE_V3_WEIGHTS + ["config.json"], allow_patterns=allow_patterns)) or tmp_path)
    M.resolve("openai/whisper-large-v3")
    assert "config.json" in fetched and [f for f in fetched if f.endswith(".safetensors")] == ["model.safetensors"]

    folder = tmp_path / "whisper"  # a local copy with all the files: only model.safetensors is read
    shutil.copytree(tiny_dir / "encoder", folder)
    for name in WHISPER_LARGE_V3_WEIGHTS[1:3]:
        shutil.copy(folder / "model.safetensors", folder / name)
    assert M.safetensors_files(folder) == [folder / "model.safetensors"]


def test_llaso_random_has_the_papers_shapes(capsys):
    """`python model.py --preset llaso-random` counts Whisper-large-v3's encoder, the projector and
    Llama-3.2-3B-Instruct on the meta device; its tokenizer has Llama-3's special-token ids."""
    d, ffn = 1280, 5120
    layer = (4 * d * d + 3 * d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d  # attention (no k bias), FFN, 2 LN
    encoder = (128 * d * 3 + d) + (d * d * 3 + d) + 1500 * d + 32 * layer + 2 * d  # convs, positions, final LN
    M.main(["--preset", "llaso-random"])
    assert capsys.readouterr().out.splitlines() == [
        f"encoder: {encoder:,} parameters",  # 635,048,960 + 1,920,000 position rows
        "projector: 13,375,488 parameters",  # 1280*3072+3072 + 3072*3072+3072
        f"llm: {3_212_749_824 + 5 * 3072:,} parameters",  # Llama-3.2-3B + the five new embedding rows (tied)
    ]
    tokenizer = M.preset_parts("llaso-random")[2]
    assert len(tokenizer) == 128256 and tokenizer.convert_tokens_to_ids(M.EOS_TOKENS) == [128001, 128008, 128009]
    ids = M.encode(tokenizer, M.prompt_text("Transcribe the speech.<audio>"))
    assert ids[0] == 128000 and ids.count(128006) == 3 and ids.count(M.AUDIO_ID) == 1


def test_the_committed_tiny_models_are_what_make_models_writes(tmp_path):
    M.make_models().write_tiny(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(M.TINY) for p in M.TINY.rglob("*") if p.is_file())
    for name in written:
        assert (tmp_path / name).read_bytes() == (M.TINY / name).read_bytes(), name


def test_tiny_encoder_hears_the_audio(tiny_config):
    """Two different spoken sentences must give clearly different encoder outputs (else training is vacuous)."""
    clips = sorted((SAMPLE / "audio").rglob("*.wav"))[:2]
    assert len(clips) == 2, "the sample corpus (sample/audio) is missing"
    encoder, features = M.load_encoder(tiny_config.encoder)
    audio = [sf.read(c, dtype="float32")[0] for c in clips]
    mels = torch.from_numpy(features(audio, sampling_rate=16000, return_tensors="np").input_features)
    assert mels.shape == (2, 128, 3000)

    def relative_difference(enc):
        with torch.no_grad():
            out = enc(mels).last_hidden_state
        assert out.shape == (2, 1500, enc.config.d_model)
        return ((out[0] - out[1]).norm() / out[0].norm()).item()

    torch.manual_seed(0)
    default = M.WhisperEncoder(encoder.config).eval()  # transformers' default init, for contrast
    ours, theirs = relative_difference(encoder), relative_difference(default)
    assert ours > 0.3, ours
    assert ours > 10 * theirs, (ours, theirs)
