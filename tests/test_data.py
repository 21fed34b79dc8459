"""data.py: the offset index equals json.load, audio front end, samplers, dataset/collate, preflight CLI."""

import json
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from transformers import WhisperFeatureExtractor

import data as D

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample"

# ---------------------------------------------------------------------------------------------------- helpers

TRICKY = ["a", " ", '"', "\\", "}", "{", "]", "[", ",", "\n", "\t", "é", "中", "😀", "\u2028", "<audio>", "\\u00e9"]


def tricky_text(rng, n=12):
    return "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, n)))


def tricky_records(n=300, seed=0):
    """LLaSO-shaped records full of what trips naive scanners: escapes, unicode, brackets in strings, nesting."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        human = "Transcribe the audio.<audio>" if i % 3 else "<audio>" + tricky_text(rng)
        record = {
            "voice": [f"vctk/wav48\\p{i}\\p{i}_{tricky_text(rng, 4)}.flac"] if i % 5 else f"x\\{i}.wav",
            "conversations": [{"from": "human", "value": human + tricky_text(rng)},
                              {"from": "gpt", "value": tricky_text(rng, 40)}],
            "metadata": {"age": rng.choice([24, -1.5e-3, 12345678901234567, None, True]),
                         "tags": [tricky_text(rng), {"}": "{", "list": [[], {}, [1, [2, [3]]]]}]},
        }
        if i % 7 == 0:
            record["meta-data"] = {"Utterance": tricky_text(rng)}
        records.append(record)
    return records


def chars(record):
    return sum(len(turn["value"]) for turn in record["conversations"])


def write_wav(path, x, sr=16000, subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype=subtype)
    return path


def record(voice, human="Transcribe the audio.<audio>", answer="Hello.", **extra):
    return {"voice": voice, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            **extra}


# ---------------------------------------------------------------------------------------------------- record index


@pytest.mark.parametrize("block_bytes", [3, 61, 1 << 20])
@pytest.mark.parametrize("ensure_ascii,indent", [(True, None), (False, None), (False, 2), (True, 4)])
def test_index_yields_exactly_what_json_load_yields(tmp_path, monkeypatch, block_bytes, ensure_ascii, indent):
    monkeypatch.setattr(D, "BLOCK_BYTES", block_bytes)  # small blocks put block edges inside every kind of token
    records = tricky_records()
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records, ensure_ascii=ensure_ascii, indent=indent), encoding="utf-8")
    expected = json.load(open(path, encoding="utf-8"))
    corpus = D.Corpus(path, cache_dir=tmp_path / "cache")
    assert len(corpus) == len(expected)
    assert [corpus.read(i) for i in range(len(corpus))] == expected
    assert corpus.lengths().tolist() == [chars(r) for r in expected]
    assert corpus.configs().tolist() == [0 if i % 3 else 1 for i in range(len(expected))]  # by placeholder position


def test_jsonl_and_broken_lines(tmp_path):
    records = tricky_records(50)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines[10] = '{"voice": ["a.wav"], "conversations": [}'  # a broken line is indexed and reported, not fatal
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines[:20]) + "\n\n" + "\r\n".join(lines[20:]) + "\n", encoding="utf-8")
    corpus = D.Corpus(path, cache_dir=tmp_path / "cache")
    assert len(corpus) == 50
    for i in range(50):
        if i == 10:
            with pytest.raises(D.RecordError, match="malformed JSON"):
                corpus.read(i)
        else:
            assert corpus.read(i) == records[i]
    assert corpus.configs()[10] == -1


def four_records() -> bytes:
    """A JSON list of four records with non-ASCII answers, so that byte offsets differ from character offsets."""
    return json.dumps([record(f"a{i}.wav", answer=f"Résumé {i}.") for i in range(4)], ensure_ascii=False).encode()


def broken_files() -> dict:
    """name: (file bytes, what the error must say). The byte offsets are json.load's own (the oracle)."""
    def json_load_fails_at(data):  # the byte where json.load stops
        with pytest.raises(json.JSONDecodeError) as error:
            json.loads(data.decode())
        return len(data.decode()[: error.value.pos].encode())

    raw = four_records()
    at = raw.index(b'"from": "gpt"', raw.index(b"a2.wav"))
    syntax = raw[:at] + b'"from" "gpt"' + raw[at + 13 :]
    at = raw.index("é".encode(), raw.index(b"a2.wav"))
    not_utf8 = raw[:at] + b"\xff" + raw[at + 2 :]
    with pytest.raises(UnicodeDecodeError) as error:
        not_utf8.decode()
    one_object = json.dumps({"records": json.loads(raw)}, indent=2).encode()  # a dict of 4 records, pretty-printed
    return {"syntax.json": (syntax, f"record 2, byte {json_load_fails_at(syntax)}: malformed JSON (Expecting ':' "
                                    "delimiter)"),
            "not_utf8.json": (not_utf8, f"record 2, byte {error.value.start}: byte 0xff is not UTF-8"),
            "cut.json": (raw[:-30], f"record 3, byte {json_load_fails_at(raw[:-30])}: the file ends inside this "
                                    "record"),
            "empty.json": (b"", "the file is empty"),
            "empty.jsonl": (b"\n \n", "the file is empty"),
            "dict.json": (one_object, "expected a JSON list of records, or JSONL"),
            "one_line_dict.json": (json.dumps(record("a.wav")).encode(), "expected a JSON list of records, or JSONL")}


@pytest.mark.parametrize("name", list(broken_files()))
def test_broken_corpus_file_is_one_line_naming_file_record_and_byte(tmp_path, name):
    data, words = broken_files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(D.CorpusError) as error:
        D.Corpus(path, cache_dir=tmp_path / "cache")
    assert str(error.value).startswith(f"{path}: ") and words in str(error.value) and "\n" not in str(error.value)
    assert not list((tmp_path / "cache").glob("*"))  # no index of a broken file


def test_a_json_list_and_jsonl_are_told_apart_by_content(tmp_path):
    lines = tmp_path / "lines.json"  # JSONL under a .json name (the first line is a whole object, more follow)
    lines.write_text("\n".join(json.dumps(record(f"a{i}.wav")) for i in range(3)))
    listed = tmp_path / "list.jsonl"  # a JSON list under a .jsonl name
    listed.write_text(json.dumps([record(f"b{i}.wav") for i in range(2)], indent=2))
    corpus = D.Corpus([lines, listed], cache_dir=tmp_path / "cache")
    assert [corpus.read(i)["voice"] for i in range(5)] == ["a0.wav", "a1.wav", "a2.wav", "b0.wav", "b1.wav"]


def test_folder_tree_and_modality_configs(tmp_path):
    tree = {"text_audio/asr_test.json": [record("a.wav")] * 2,
            "audio_text/dolly_instruction_0_test.json": [record("a.wav", "<audio>Who?")] * 3,
            "pure_audio/alpaca_gpt4_end_test.json": [record("a.wav", "Listen.<audio>")] * 1,
            "other/dolly_instruction_0_test.json": [record("a.wav", "Listen.<audio>")],  # name says (a,t)
            "other/code_end.jsonl": [record("a.wav", "<audio>Hi")],  # name says (a)
            "other/mixed.json": [record("a.wav", " <audio>Hi"), record("a.wav", "Hi<audio>")]}  # per record
    for name, records in tree.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(map(json.dumps, records)) if name.endswith(".jsonl") else json.dumps(records)
        (tmp_path / name).write_text(text)
    corpus = D.Corpus([tmp_path / "text_audio", tmp_path / "audio_text", tmp_path / "pure_audio",
                       tmp_path / "other"], cache_dir=tmp_path / "cache")
    assert [f.relative_to(tmp_path).as_posix() for f in corpus.files] == [
        "text_audio/asr_test.json", "audio_text/dolly_instruction_0_test.json",
        "pure_audio/alpaca_gpt4_end_test.json", "other/code_end.jsonl", "other/dolly_instruction_0_test.json",
        "other/mixed.json"]
    assert corpus.configs().tolist() == [0, 0, 1, 1, 1, 2, 2, 1, 1, 0]
    assert corpus.locate(9) == (tmp_path / "other/mixed.json", 1)
    assert D.Corpus(tmp_path, cache_dir=tmp_path / "cache").configs().tolist() == [1, 1, 1, 2, 1, 1, 0, 2, 0, 0]


def test_index_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([record("a.wav")] * 3))
    assert len(D.Corpus(path)) == 3
    assert (tmp_path / "c.json.idx").is_file()  # default: beside the corpus

    def no_rebuild(*args):
        raise AssertionError("index rebuilt although the corpus did not change")

    with monkeypatch.context() as m:
        m.setattr(D, "build_index", no_rebuild)
        assert len(D.Corpus(path)) == 3

    path.write_text(json.dumps([record("a.wav")] * 5))  # size changes
    assert len(D.Corpus(path)) == 5
    path.write_text(json.dumps([record("b.wav")] * 5))  # same size: only the mtime tells
    os.utime(path, ns=(1, 1))
    corpus = D.Corpus(path)
    assert corpus.read(4)["voice"] == "b.wav"

    cache = tmp_path / "cache"
    corpus = D.Corpus(path, cache_dir=cache)
    assert len(corpus) == 5 and len(list(cache.glob("c.json.*.idx"))) == 1

    state = pickle.dumps(corpus)  # what DataLoader workers started by spawn receive: paths, not the index
    assert len(state) < 1000 and pickle.loads(state).read(4) == corpus.read(4)


def test_indexing_does_not_hold_records_in_memory(tmp_path):
    path = tmp_path / "big.json"
    line = '{"voice": ["a\\\\%d.wav"], "conversations": [{"from": "human", "value": "Transcribe.<audio>"}, ' \
           '{"from": "gpt", "value": "r\\u00e9sum\\u00e9 %d"}]}'
    path.write_text("[\n" + ",\n".join(line % (i, i) for i in range(200_000)) + "\n]\n")
    bound = 8 << 20  # the corpus is read in 1 MB blocks; the index (21 B/record) is flushed every 4k records

    def peak(fn):
        tracemalloc.start()
        fn()
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes

    assert peak(lambda: D.build_index(path, tmp_path / "big.idx")) < bound
    assert peak(lambda: json.load(open(path))) > bound  # so the bound does tell the two apart
    assert D._read_header(tmp_path / "big.idx")["records"] == 200_000


# ---------------------------------------------------------------------------------------------------- audio


def test_chunk_boundaries():
    def sizes(n, **kw):
        chunks, dropped = D.split_chunks(np.zeros(n, np.float32), **kw)
        return [len(c) for c in chunks], dropped

    assert sizes(480_000) == ([480_000], 0)  # exactly 30 s: one chunk
    assert sizes(480_001) == ([480_000, 1], 0)  # 30 s + 1 sample: two
    chunks, dropped = sizes(700 * 16_000)  # 700 s = 23.3 windows: 20 kept, 4 cut and counted
    assert len(chunks) == 20 and set(chunks) == {480_000} and dropped == 4
    assert sizes(480_000, compat=True) == ([480_000], 0)  # reference: slices of 480,001 ...
    assert sizes(480_001, compat=True) == ([480_001], 0)  # ... so 30 s + 1 sample is still one chunk
    assert sizes(960_003, compat=True) == ([480_001, 480_001, 1], 0)
    assert sizes(21 * 480_001, compat=True)[1] == 1


def test_features_pad_and_truncate_each_chunk_like_separate_calls():
    fe = WhisperFeatureExtractor(feature_size=128)
    rng = np.random.default_rng(0)
    loud, quiet = rng.normal(0, 0.5, 480_001).astype(np.float32), rng.normal(0, 1e-3, 16_000).astype(np.float32)
    mels = D.log_mel([loud, quiet], fe)
    assert mels.shape == (2, 128, 3000) and mels.dtype == np.float32
    # batching must not mix chunks (per-chunk clamp at max - 8); the 480,001st sample is cut as in the reference
    np.testing.assert_allclose(mels[0], D.log_mel([loud[:480_000]], fe)[0], atol=1e-5)
    np.testing.assert_allclose(mels[1], D.log_mel([quiet], fe)[0], atol=1e-5)


def test_audio_loading(tmp_path):
    t = np.arange(16_000) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = write_wav(tmp_path / "stereo.wav", np.stack([tone, 0.2 * np.ones_like(tone)], 1), subtype="FLOAT")
    np.testing.assert_allclose(D.load_audio(stereo), (tone + 0.2) / 2, atol=1e-6)  # channel mean
    for sr in (8_000, 44_100):
        x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * sr) / sr)).astype(np.float32)
        y = D.load_audio(write_wav(tmp_path / f"{sr}.wav", x, sr, subtype="FLOAT"))
        assert y.dtype == np.float32 and len(y) == 32_000  # 2 s at 16 kHz
        np.testing.assert_array_equal(y, soxr.resample(x, sr, 16_000, quality="HQ"))
    assert D.resolve_audio(tmp_path, "sub\\dir/a\\b.wav") == tmp_path / "sub/dir/a/b.wav"
    assert D.resolve_audio(tmp_path, "sub/../b.wav") == tmp_path / "sub/../b.wav"  # stays inside the root
    for outside in ("/data/x.wav", "..\\..\\x.wav", "a/../../x.wav", "C:\\audio\\x.wav", "\\\\server\\x.wav"):
        with pytest.raises(D.RecordError, match="leaves the audio root"):
            D.resolve_audio(tmp_path, outside)
    assert D.resolve_audio("", "/data/x.wav") == Path("/data/x.wav")  # no root: files named on the command line

    bad = {"empty": write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32)),
           "unreadable": tmp_path / "corrupt.wav",
           "not found": tmp_path / "missing.wav",
           "NaN": write_wav(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], np.float32), subtype="FLOAT")}
    bad["unreadable"].write_bytes(b"RIFF" + os.urandom(200))
    for reason, path in bad.items():
        with pytest.raises(D.RecordError, match=reason) as error:
            D.load_audio(path)
        assert str(path) in str(error.value)


def test_resampled_length_is_librosas(tmp_path):
    """librosa.resample, which the reference calls, fixes the length to ceil(n * 16000 / sr) (zero-padding the end);
    soxr alone gives one sample fewer for these 44.1 kHz lengths."""
    rng = np.random.default_rng(0)
    for n in (44_001, 44_004, 1_323_003):  # 1 s, 30 s (+ a few samples) at 44.1 kHz
        x = rng.normal(0, 0.1, n).astype(np.float32)
        plain = soxr.resample(x, 44_100, 16_000, quality="HQ")
        assert len(plain) == -(-n * 16_000 // 44_100) - 1  # the case that differed
        y = D.load_audio(write_wav(tmp_path / f"{n}.wav", x, 44_100, subtype="FLOAT"))
        assert len(y) == -(-n * 16_000 // 44_100)
        np.testing.assert_array_equal(y[:-1], plain)
        assert y[-1] == 0
    # with --compat-chunks the reference cuts ceil(480,002 / 480,001) = 2 chunks from the 30 s file, not 1
    assert len(D.split_chunks(y, compat=True)[0]) == 2


# ---------------------------------------------------------------------------------------------------- samplers


def run(order, micro_batch, grad_accum, world, start_step=0):
    """Per step: the micro-batches of all ranks, rank by rank."""
    samplers = [D.StepSampler(order, micro_batch, grad_accum, world, r, start_step) for r in range(world)]
    return [[mb for s in samplers for mb in s.micro_batches(step)] for step in range(start_step, samplers[0].steps)]


def test_shuffled_sampler_is_deterministic_and_rank_independent():
    n = 1003
    order = D.shuffled_order(n, seed=42, epoch=0)
    assert sorted(order) == list(range(n))
    assert np.array_equal(order, D.shuffled_order(n, 42, 0))
    assert not np.array_equal(order, D.shuffled_order(n, 42, 1))
    assert not np.array_equal(order, D.shuffled_order(n, 43, 0))

    one_rank = run(order, micro_batch=2, grad_accum=8, world=1)
    assert run(order, micro_batch=2, grad_accum=4, world=2) == one_rank  # same micro-batches in every step
    assert run(order, micro_batch=2, grad_accum=2, world=4) == one_rank
    assert len(one_rank) == n // 16  # incomplete last global batch dropped
    assert run(order, 2, 4, 2, start_step=7) == one_rank[7:]  # resume = tail of the full run

    sampler = D.StepSampler(order, 2, 4, world_size=2, rank=1, start_step=60)
    assert list(sampler) == [mb for step in one_rank[60:] for mb in step[4:]] and len(sampler) == 2 * 4


def test_grouped_sampler_follows_the_reference_megabatch_scheme():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2000, 1000)
    G = 32  # one optimizer step
    order = D.grouped_order(lengths, G, seed=42, epoch=0)
    assert sorted(order) == list(range(1000))
    assert np.array_equal(order, D.grouped_order(lengths, G, 42, 0))
    assert not np.array_equal(order, D.grouped_order(lengths, G, 42, 1))

    steps = order[: 1000 // G * G].reshape(-1, G)
    spans = sorted(((lengths[s].max(), lengths[s].min()) for s in steps), reverse=True)
    assert all(lo >= next_hi for (_, lo), (next_hi, _) in zip(spans, spans[1:]))  # steps = slices of the sort
    assert np.mean([hi - lo for hi, lo in spans]) < 150  # near-identical lengths inside a step
    maxima = [lengths[s].max() for s in steps]
    assert maxima != sorted(maxima, reverse=True)  # steps come in shuffled order, not longest first
    leftover = order[1000 // G * G :]
    assert list(leftover) == sorted(leftover)  # the leftover pool, sorted by index, comes last

    assert run(order, 1, 16, 2) == run(order, 1, 32, 1)
    by_type = D.grouped_order(lengths, G, 42, 0, types=np.arange(1000) % 2)
    assert all(len(set(s % 2)) == 1 for s in by_type[: 1000 // G * G].reshape(-1, G)[:-1])


def reference_grouped_order(lengths, types, megabatch_size, rng):
    """A port of the reference's stage-2 order (EIT-NLP/LLaSO llaso/train/llava_trainer.py:
    get_modality_length_grouped_indices with get_length_grouped_indices on its default path), line for line in
    plain Python. Only its torch.randperm calls are replaced by rng.permutation, drawn in the same order."""
    indices_by_type = {t: [] for t in set(types)}
    lengths_by_type = {t: [] for t in set(types)}
    for i, length in enumerate(lengths):
        indices_by_type[types[i]].append(i)
        lengths_by_type[types[i]].append(length)
    megabatches, additional_batch = [], []
    for t in indices_by_type:
        mm_indices, mm_lengths = indices_by_type[t], lengths_by_type[t]
        by_length = sorted(rng.permutation(len(mm_lengths)).tolist(), key=lambda i: mm_lengths[i], reverse=True)
        mm_shuffle = [mm_indices[i] for i in by_length]
        mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
        additional_batch += mm_megabatches[-1]
        megabatches += mm_megabatches[:-1]
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches)).tolist()]
    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))
    return [i for megabatch in megabatches for i in megabatch]


@pytest.mark.parametrize("n", [5, 32, 33, 96, 100, 320, 1000, 1024])  # 32, 96, 320, 1024: multiples of the batch
@pytest.mark.parametrize("n_types", [1, 2])
def test_grouped_order_equals_the_reference(n, n_types):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 40, n).tolist()  # many ties: the sorts must be stable the same way
    types = [i % n_types for i in range(n)] if n_types > 1 else [0] * n
    G, seed, epoch = 32, 42, 3
    expected = reference_grouped_order(lengths, types, G, np.random.default_rng([seed, epoch]))
    order = D.grouped_order(np.array(lengths), G, seed, epoch, types=np.array(types) if n_types > 1 else None)
    assert order.tolist() == expected


# ---------------------------------------------------------------------------------------------------- dataset, batch


@pytest.fixture(scope="module")
def tokenizer(tiny_config):
    import model as M

    return M.load_llm(tiny_config.llm)[1]


@pytest.fixture(scope="module")
def features(tiny_dir):
    return WhisperFeatureExtractor.from_pretrained(tiny_dir / "encoder")


def test_dataset_and_collate_on_the_sample_corpus(tmp_path, tokenizer, features):
    import model as M

    corpus = D.Corpus([SAMPLE / "LLaSO-Instruct" / c for c in ("text_audio", "audio_text", "pure_audio")],
                      cache_dir=tmp_path)
    configs = corpus.configs()
    pick = [int(np.flatnonzero(configs == c)[0]) for c in range(3)]  # one record of each modality configuration
    dataset = D.LLaSODataset(corpus, tokenizer, features, SAMPLE / "audio")
    batch = D.collate([dataset[i] for i in pick])
    assert batch["skipped"] == [] and len(batch["input_ids"]) == 3
    for ids, labels, i in zip(batch["input_ids"], batch["labels"], pick):
        human, answer = D.conversation(corpus.read(i))
        assert (ids.tolist(), labels.tolist()) == M.tokenize(tokenizer, human, answer)
    assert [(ids == M.AUDIO_ID).sum().item() for ids in batch["input_ids"]] == [1, 1, 1]
    assert batch["audio_chunks"].tolist() == [1, 1, 1]  # sample clips are shorter than 30 s
    assert batch["mels"].shape == (3, 128, 3000)
    assert batch["records"] == [corpus.read(i) for i in pick] and batch["indices"] == pick

    generation = D.LLaSODataset(corpus, tokenizer, features, SAMPLE / "audio", eval_mode=True)
    item = generation[pick[0]]
    assert set(item["labels"]) == {M.IGNORE}
    assert item["input_ids"] == M.tokenize(tokenizer, D.conversation(corpus.read(pick[0]))[0], None)[0]

    loader = D.make_loader(dataset, D.StepSampler(np.arange(8), 2, 2), num_workers=2)  # features in workers
    batches = list(loader)
    assert [b["indices"] for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(b["mels"].shape[0] == b["audio_chunks"].sum() for b in batches)


def test_bad_records_are_skipped_named_and_counted(tmp_path, tokenizer, features):
    wav = write_wav(tmp_path / "audio/dir/ok.wav", np.full(16_000, 0.1, np.float32)).name
    long_wav = write_wav(tmp_path / "audio/long.wav", np.full(31 * 16_000, 0.1, np.float32)).name
    good = record(["dir\\" + wav])
    records = [
        good,
        record(["dir\\missing.wav"]),
        record(["dir\\" + wav, "dir\\" + wav]),  # two files, one placeholder
        {**good, "conversations": good["conversations"] * 2},  # multi-turn
        {**good, "conversations": [{"from": "system", "value": "Be brief."}] + good["conversations"]},  # dropped
        {**good, "conversations": [{"from": "human", "value": "Hi<audio>"}, {"from": "assistant", "value": "x"}]},
        record(["dir\\" + wav], answer="  "),  # empty answer
        record(["dir\\" + wav], human="Transcribe.<audio>", answer=None),  # eval-style record without gold
        record([long_wav]),  # 31 s: two chunks, one of them cut with max_chunks=1
    ]
    records[7]["conversations"] = records[7]["conversations"][:1]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(map(json.dumps, records)) + '\n{"voice": ["a.wav"], "conversations": [}\n')
    corpus = D.Corpus(path, cache_dir=tmp_path / "cache")
    dataset = D.LLaSODataset(corpus, tokenizer, features, tmp_path / "audio", max_chunks=1)
    batch = D.collate([dataset[i] for i in range(len(corpus))])

    assert batch["indices"] == [0, 4, 8]
    assert batch["audio_chunks"].tolist() == [1, 1, 1] and batch["mels"].shape[0] == 3
    assert batch["cut"] == [(str(path), 8, "long.wav: 1 chunk(s) of 30 s beyond 1 dropped")]
    skipped = {no: reason for file, no, reason in batch["skipped"]}
    assert {file for file, _, _ in batch["skipped"]} == {str(path)}
    assert sorted(skipped) == [1, 2, 3, 5, 6, 7, 9]
    for no, words in {1: "not found", 2: "2 'voice' files", 3: "found roles ['human', 'gpt', 'human', 'gpt']",
                      5: "'assistant'", 6: "empty answer", 7: "found roles ['human']", 9: "malformed JSON"}.items():
        assert words in skipped[no]
    assert batch["skipped_records"][0] == records[1] and batch["skipped_records"][-1] is None

    evaluation = D.collate([D.LLaSODataset(corpus, tokenizer, features, tmp_path / "audio", eval_mode=True)[i]
                            for i in range(len(corpus))])
    assert evaluation["indices"] == [0, 4, 6, 7, 8]  # no gold needed; still nothing vanishes:
    assert len(evaluation["indices"]) + len(evaluation["skipped"]) == len(corpus)

    strict = D.LLaSODataset(corpus, tokenizer, features, tmp_path / "audio", strict=True)
    with pytest.raises(D.RecordError, match=r"corpus\.jsonl record 1: audio file not found"):
        strict[1]


def test_audio_placeholder_in_an_answer_is_skipped_and_takes_no_audio(tmp_path, tokenizer, features, make_tiny):
    """Tokenised, '<audio>' in an answer is a placeholder: in a batch it took the next record's audio, then splice
    ran out of audio (IndexError)."""
    import torch

    rng = np.random.default_rng(0)
    write_wav(tmp_path / "audio/a.wav", np.sin(np.arange(16_000) / 5).astype(np.float32) * 0.3)
    write_wav(tmp_path / "audio/b.wav", rng.normal(0, 0.3, 16_000).astype(np.float32))
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([record(["a.wav"], answer="It says <audio> twice."), record(["b.wav"])]))
    dataset = D.LLaSODataset(D.Corpus(path, cache_dir=tmp_path / "cache"), tokenizer, features, tmp_path / "audio")
    batch, alone = D.collate([dataset[0], dataset[1]]), D.collate([dataset[1]])

    assert [(file, no) for file, no, _ in batch["skipped"]] == [(str(path), 0)]
    assert "the answer (gpt turn) contains '<audio>'" in batch["skipped"][0][2]
    assert torch.equal(batch["mels"], alone["mels"]) and batch["audio_chunks"].tolist() == [1]
    assert [ids.tolist() for ids in batch["input_ids"]] == [ids.tolist() for ids in alone["input_ids"]]
    model = make_tiny()
    with torch.no_grad():
        assert torch.equal(model(batch), model(alone))


def test_audio_paths_that_leave_the_root_are_skipped(tmp_path, tokenizer, features):
    root = tmp_path / "data/audio"
    write_wav(root / "dir/ok.wav", np.full(16_000, 0.1, np.float32))
    outside = write_wav(tmp_path / "x.wav", np.full(16_000, 0.1, np.float32))  # readable, but not under the root
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([record("dir\\ok.wav"), record(str(outside)), record("..\\..\\x.wav"),
                                record("dir/../dir\\ok.wav")]))
    dataset = D.LLaSODataset(D.Corpus(path, cache_dir=tmp_path / "cache"), tokenizer, features, root)
    batch = D.collate([dataset[i] for i in range(4)])
    assert batch["indices"] == [0, 3]
    assert [(no, reason) for _, no, reason in batch["skipped"]] == [
        (1, f"audio path '{outside}' leaves the audio root (--audio-root): corpus paths must be relative to it"),
        (2, "audio path '..\\..\\x.wav' leaves the audio root (--audio-root): corpus paths must be relative to it")]


# ---------------------------------------------------------------------------------------------------- preflight


def preflight_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_preflight_cli_refuses_broken_corpus_files(tmp_path):
    for name, (data, words) in broken_files().items():
        (tmp_path / name).write_bytes(data)
        result = preflight_cli(tmp_path / name, "--cache-dir", tmp_path / "cache")
        assert result.returncode == 2 and result.stderr == "", result.stderr
        assert result.stdout.startswith(f"error: {tmp_path / name}: ") and result.stdout.count("\n") == 1
        assert words in result.stdout


def test_preflight_cli_lists_what_training_would_skip(tmp_path):
    audio = tmp_path / "audio"
    write_wav(audio / "spk/good.wav", np.full(1600, 0.1, np.float32))
    write_wav(audio / "spk/nan.wav", np.array([0.1, np.nan, 0.2], np.float32), subtype="FLOAT")
    write_wav(audio / "spk/inf.wav", np.array([0.1, np.inf, 0.2], np.float32), subtype="FLOAT")
    sf.write(audio / "spk/broken.flac", np.random.default_rng(0).normal(0, 0.3, 48_000).astype(np.float32), 16_000)
    flac = bytearray((audio / "spk/broken.flac").read_bytes())  # a good header, then frames that do not decode
    flac[len(flac) // 2 : len(flac) // 2 + 2000] = b"\xab" * 2000
    (audio / "spk/broken.flac").write_bytes(bytes(flac))
    write_wav(tmp_path / "x.wav", np.full(1600, 0.1, np.float32))
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([record("spk\\good.wav"), record("spk\\nan.wav"), record("spk\\inf.wav"),
                                  record("spk\\broken.flac"), record("..\\x.wav"),
                                  record("spk\\good.wav", answer="It says <audio>.")]))
    run = {decode: preflight_cli(corpus, "--audio-root", audio, "--cache-dir", tmp_path, *["--decode"] * decode)
           for decode in (False, True)}
    for result in run.values():
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"audio: {corpus} record 4: audio path '..\\x.wav' leaves the audio root" in result.stdout
        assert f"malformed: {corpus} record 5: the answer (gpt turn) contains '<audio>'" in result.stdout
    assert "record 1" not in run[False].stdout and "record 3" not in run[False].stdout  # headers are fine
    assert "audio problems: 1; audio check: headers only" in run[False].stdout
    for no, words in {1: "audio file contains NaN", 2: "audio file contains NaN", 3: "unreadable audio file"}.items():
        assert f"audio: {corpus} record {no}: {words}" in run[True].stdout
    assert "audio problems: 4; audio check: every file decoded" in run[True].stdout
    no_root = preflight_cli(corpus, "--cache-dir", tmp_path)  # the path check needs no audio root
    assert no_root.returncode == 1 and "record 4: audio path '..\\x.wav' leaves the audio root" in no_root.stdout
    assert "audio problems: 1; audio files not checked (no --audio-root)" in no_root.stdout




def test_preflight_cli_names_missing_audio(tmp_path):
    write_wav(tmp_path / "audio/spk/a.wav", np.full(1600, 0.1, np.float32))
    (tmp_path / "audio/spk/corrupt.wav").write_bytes(b"not audio")
    corpus = tmp_path / "pure_audio" / "x_end_test.json"
    corpus.parent.mkdir()
    corpus.write_text(json.dumps([record("spk\\a.wav"), record(["spk\\gone.wav"]), record(["spk\\a.wav"])]))

    def preflight(*args):
        return preflight_cli(corpus, "--cache-dir", tmp_path, *args)

    ok = preflight()  # without --audio-root only the records are checked
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3        0        0        3" in ok.stdout

    missing = preflight("--audio-root", str(tmp_path / "audio"))
    assert missing.returncode == 1
    assert f"{corpus} record 1: audio file not found: {tmp_path / 'audio/spk/gone.wav'}" in missing.stdout

    corpus.write_text(json.dumps([record("spk\\corrupt.wav"), record("spk\\a.wav", answer="")]))
    bad = preflight("--audio-root", str(tmp_path / "audio"))
    assert bad.returncode == 1
    assert "record 0: unreadable audio file" in bad.stdout and "record 1: empty answer" in bad.stdout
