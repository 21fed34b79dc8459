"""LLaSO data, in the order it flows: record index → audio → features → prompt/labels → batch → sampler.

Each corpus file (a JSON list of several GB, or JSONL) is scanned once into a byte-offset index, cached and
memory-mapped; a record is parsed only when it is read (README, data.py). Preflight check before a run:

    python data.py sample/ --audio-root sample/audio
    python data.py LLaSO-Instruct/ --audio-root /data/llaso/audio --decode
    python data.py LLaSO-Align/text_audio/ASR_stage1_train.json --audio-root /data/llaso/audio --cache-dir /scratch/idx

Use from the training / evaluation scripts:

    corpus = Corpus(paths)                                   # builds or reuses the indexes
    dataset = LLaSODataset(corpus, tokenizer, feature_extractor, audio_root)      # eval: eval_mode=True
    order = shuffled_order(len(corpus), seed, epoch)         # stage 2: grouped_order(corpus.lengths(), ...)
    loader = make_loader(dataset, StepSampler(order, micro_batch, grad_accum, world, rank, start_step), workers)
"""

# torch, transformers and model.py are imported inside the functions that need them: `import torch` alone costs
# ~200 MB of RSS, and indexing / preflight must stay small.
import argparse
import hashlib
import json
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from json.scanner import make_scanner
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO = "<audio>"  # placeholder in human turns (same string as model.AUDIO)
# LLaSO's modality configurations: text instruction + audio input, audio instruction + text input, pure audio (the
# instruction is spoken); only where <audio> sits in the human turn tells them apart. Code = position, -1 = unusable.
CONFIGS = ("(t,a)", "(a,t)", "(a)")
FOLDER_CONFIG = {"text_audio": 0, "audio_text": 1, "pure_audio": 2}


# ----- record index -------------------------------------------------------------------------------------------------

INDEX_VERSION = 1
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8"), ("chars", "<u4"), ("config", "i1")])
HEADER_BYTES = 4096  # JSON header (format version, source size/mtime, record count), then the packed rows
BLOCK_BYTES = 1 << 20  # corpus bytes read per step while indexing (larger is not faster)
MAX_RECORD_BYTES = 16 << 20  # a "record" that does not parse within this many bytes is malformed JSON
# The project's one cache folder (the llaso-random preset's models, indexes of read-only corpora).
DEFAULT_CACHE_DIR = Path(os.environ.get("LLASO_CACHE")
                         or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llaso-mini").expanduser()
_SPACE = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")


class CorpusError(ValueError):
    """A corpus file that cannot be indexed at all; one line naming the file (and record and byte where it breaks)."""


class RecordError(ValueError):
    """A record that cannot be used. Raised with the reason; LLaSODataset adds the file and record number."""


def corpus_files(paths: list, pattern: str = "*") -> list[Path]:
    """Files named by `paths`; a folder stands for every *.json / *.jsonl below it matching `pattern`, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob(pattern) if f.suffix in (".json", ".jsonl") and f.is_file())
            if not found:
                raise CorpusError(f"{p}: folder contains no {pattern} .json or .jsonl corpus files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"{p}: corpus file or folder not found")
    return files


def file_config(path: Path) -> int | None:
    """Modality configuration shared by a whole file: from its folder, else its name; None = decide per record."""
    if path.parent.name in FOLDER_CONFIG:
        return FOLDER_CONFIG[path.parent.name]
    stem = re.sub(r"_(train|test|eval)$", "", path.stem)
    if stem.endswith("_instruction_0"):
        return 1
    if stem.endswith("_end"):
        return 2
    return None


def record_stats(record, config: int | None) -> tuple[int, int]:
    """(characters of all turns, modality code) of one record — what the samplers and the preflight need."""
    try:
        turns = record["conversations"]
        chars = sum([len(turn["value"]) for turn in turns])  # the reference groups by characters, not tokens
        if config is None:  # no folder or file-name hint: audio first = (a,t), else (t,a); (a) looks like (t,a)
            human = turns[0]["value"] if turns[0]["from"] == "human" else turns[1]["value"]
            config = 1 if human.lstrip().startswith(AUDIO) else 0
        return chars, config
    except (KeyError, TypeError, AttributeError, IndexError):
        return 0, -1  # not a usable record (or None: a broken JSONL line); reading it later says why


def scan_json_array(f, name) -> Iterator[tuple[int, int, object]]:
    """Yield (byte offset, byte length, element) per element of a top-level JSON array, as json.load parses it, and
    CorpusError where json.load fails. Blocks are decoded as latin-1 (one character per byte): positions are byte
    offsets, JSON syntax (ASCII) is seen as it is, and an element with non-ASCII text is parsed again from its bytes."""
    scan_once = make_scanner(json.JSONDecoder())
    text, base, ascii_text, eof = "", 0, True, False  # text holds the file's bytes [base, base + len(text))

    def refill(keep_from):  # drop text before keep_from, append the next block; returns keep_from's new position
        nonlocal text, base, ascii_text, eof
        data = f.read(BLOCK_BYTES)
        eof = not data
        text, base = text[keep_from:] + data.decode("latin-1"), base + keep_from
        ascii_text = text.isascii()
        return 0

    def skip_space(pos):
        while True:
            pos = _SPACE.match(text, pos).end()
            if pos < len(text) or eof:
                return pos
            pos = refill(pos)

    def failure(record_no, pos, error) -> CorpusError:  # one line: file, record, and the byte where json.load fails
        if isinstance(error, UnicodeDecodeError):
            at = pos + error.start
            what = f"byte 0x{error.object[error.start]:02x} is not UTF-8 text (corpus files must be UTF-8)"
        else:
            at, msg = (error.value, "Expecting value") if isinstance(error, StopIteration) else (error.pos, error.msg)
            what = f"malformed JSON ({msg.removesuffix(' starting at').removesuffix(' at')})"
            if eof and (at >= len(text) or msg.startswith("Unterminated string")):
                what = "the file ends inside this record (cut short?)"
        return CorpusError(f"{name}: record {record_no}, byte {base + at}: {what}")

    pos = skip_space(refill(0))
    pos = skip_space(pos + 3 if text.startswith("\xef\xbb\xbf", pos) else pos)  # tolerate a UTF-8 byte-order mark
    if not text.startswith("[", pos):
        raise CorpusError(f"{name}: byte {base + pos}: expected '[', the start of a JSON list of records")
    pos = skip_space(pos + 1)
    if text.startswith("]", pos):
        return
    n = 0
    while True:
        try:
            element, end = scan_once(text, pos)
            if end == len(text) and not eof:  # a number might continue in the next block
                raise StopIteration(end)
            if not ascii_text and not text[pos:end].isascii():
                element = json.loads(text[pos:end].encode("latin-1"))
        except (StopIteration, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            if eof or len(text) - pos > MAX_RECORD_BYTES or isinstance(error, UnicodeDecodeError):
                raise failure(n, pos, error) from None
            pos = skip_space(refill(pos))
            continue
        yield base + pos, end - pos, element
        n += 1
        separator = _SEPARATOR.match(text, end)
        if separator is None:  # whitespace up to the block's end, ']', or a syntax error
            pos = skip_space(end)
            if text.startswith("]", pos):
                return
            if not text.startswith(",", pos):
                what = "the file ends before the list is closed (cut short?)" if pos >= len(text) else \
                    f"malformed JSON (expected ',' or ']' after the record, found {text[pos : pos + 20]!r})"
                raise CorpusError(f"{name}: after record {n - 1}, byte {base + pos}: {what}")
            separator = _SEPARATOR.match(text, pos)
        pos = separator.end()


def scan_jsonl(f) -> Iterator[tuple[int, int, object]]:
    """Yield (byte offset, byte length, parsed line) per non-empty line; a broken line yields None (unusable)."""
    offset = 0
    for line in f:
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:  # including bytes that are not UTF-8
                record = None
            yield offset, len(line.rstrip(b"\r\n")), record
        offset += len(line)


def is_jsonl(f, path: Path) -> bool:
    """A JSON list starts with '['. JSONL is a .jsonl file, or one whose first line is a whole JSON object with more
    lines after it. Anything else (an empty file, a single JSON object, other JSON) is not a corpus: CorpusError."""
    leading = b"\xef\xbb\xbf \t\r\n"  # white space, and a UTF-8 byte-order mark
    start = 0
    while (block := f.read(1 << 16)) and not block.lstrip(leading):
        start += len(block)
    if not block:
        raise CorpusError(f"{path}: the file is empty; expected a JSON list of records, or JSONL")
    first = block.lstrip(leading)[:1]
    start += len(block) - len(block.lstrip(leading))  # the first value's byte
    f.seek(0)
    if first == b"[" or path.suffix == ".jsonl":  # '[': a JSON list, whatever the file's name
        return first != b"["
    f.seek(start)
    line = f.readline(MAX_RECORD_BYTES)
    try:
        whole_line = isinstance(json.loads(line), dict)
    except ValueError:
        whole_line = False
    # any() stops at the next non-blank line: JSONL is told from a lone object without reading the file
    more = whole_line and any(rest.strip() for rest in iter(lambda: f.readline(MAX_RECORD_BYTES), b""))
    f.seek(0)
    if more:
        return True
    if whole_line:
        found = "a single JSON object"
    elif first == b"{":
        found = "a JSON object spanning several lines (JSONL with a broken first line? name it .jsonl)"
    else:
        found = repr(line[:20].decode("latin-1"))
    raise CorpusError(f"{path}: expected a JSON list of records, or JSONL (one record per line); found {found} at "
                      f"byte {start}")


def index_path(corpus_file: Path, cache_dir=None) -> Path:
    """Beside the corpus (`x.json.idx`) if that folder is writable and no cache_dir is given, else in cache_dir."""
    if cache_dir is None and os.access(corpus_file.resolve().parent, os.W_OK):
        return corpus_file.with_name(corpus_file.name + ".idx")
    tag = hashlib.sha1(str(corpus_file.resolve()).encode()).hexdigest()[:12]  # same names occur in several folders
    return Path(cache_dir or DEFAULT_CACHE_DIR) / f"{corpus_file.name}.{tag}.idx"


def _source_stamp(corpus_file: Path) -> dict:
    st = corpus_file.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_index(corpus_file: Path, index_file: Path) -> None:
    """Scan a corpus file once and write its index (to a temporary name, then renamed: ranks may race)."""
    stamp, config, count = _source_stamp(corpus_file), file_config(corpus_file), 0
    index_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_name(f"{index_file.name}.tmp{os.getpid()}")
    try:
        with open(corpus_file, "rb") as f, open(tmp, "wb") as out:
            records = scan_jsonl(f) if is_jsonl(f, corpus_file) else scan_json_array(f, corpus_file)
            rows = ((offset, length, *record_stats(record, config)) for offset, length, record in records)
            out.write(bytes(HEADER_BYTES))
            while block := list(islice(rows, 1 << 12)):  # 4k rows at a time: memory stays flat however large the file
                out.write(np.array(block, INDEX_DTYPE).tobytes())
                count += len(block)
            out.seek(0)
            out.write(json.dumps({**stamp, "records": count}).encode().ljust(HEADER_BYTES))
        os.replace(tmp, index_file)
    finally:
        tmp.unlink(missing_ok=True)


def _read_header(index_file: Path) -> dict | None:
    try:
        with open(index_file, "rb") as f:
            return json.loads(f.read(HEADER_BYTES).rstrip(b"\0 "))
    except (OSError, ValueError):
        return None


def load_index(corpus_file: Path, cache_dir=None) -> np.ndarray:
    """The memory-mapped index of one corpus file, rebuilt first if missing or if the file's size or mtime changed."""
    index_file = index_path(corpus_file, cache_dir)
    header = _read_header(index_file)
    if header is None or {k: header.get(k) for k in ("version", "size", "mtime_ns")} != _source_stamp(corpus_file):
        build_index(corpus_file, index_file)
        header = _read_header(index_file)
    if header["records"] == 0:  # nothing to map
        return np.zeros(0, INDEX_DTYPE)
    return np.memmap(index_file, INDEX_DTYPE, "r", offset=HEADER_BYTES, shape=(header["records"],))


class Corpus:
    """All records of one or more corpus files, numbered 0..N-1 in file order, parsed only when read. "Record k of a
    file" always means position k (0-based) in the list that json.load would return."""

    def __init__(self, paths, cache_dir=None):
        self.files = corpus_files([paths] if isinstance(paths, (str, Path)) else paths)
        self.cache_dir = cache_dir
        self.indexes = [load_index(f, cache_dir) for f in self.files]
        self.starts = np.cumsum([0] + [len(ix) for ix in self.indexes])

    def __len__(self):
        return int(self.starts[-1])

    def __reduce__(self):  # workers started by spawn re-open the memory maps instead of receiving a copy
        return Corpus, (self.files, self.cache_dir)

    def _file_and_record(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} is outside the corpus' 0..{len(self) - 1}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def locate(self, i: int) -> tuple[Path, int]:
        """(file, record number in that file) of global record i."""
        k, record_no = self._file_and_record(i)
        return self.files[k], record_no

    def read(self, i: int) -> dict:
        """Parse record i. A malformed JSONL line raises RecordError."""
        k, record_no = self._file_and_record(i)
        row = self.indexes[k][record_no]
        with open(self.files[k], "rb") as f:  # opened per read: safe in forked workers, ~10 µs
            f.seek(int(row["offset"]))
            return parse_record(f.read(int(row["length"])))

    def lengths(self) -> np.ndarray:
        """Characters of all turns per record (the grouped sampler's "length")."""
        return np.concatenate([ix["chars"] for ix in self.indexes]).astype(np.int64)

    def configs(self) -> np.ndarray:
        """Modality code per record: index into CONFIGS, -1 = unusable record."""
        return np.concatenate([ix["config"] for ix in self.indexes])


# ----- record checks ------------------------------------------------------------------------------------------------

def parse_record(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError as error:  # only a JSONL line can be broken: a broken JSON list is refused when indexed
        raise RecordError(f"malformed JSON ({error})") from None


def conversation(record, require_answer: bool = True) -> tuple[str, str | None]:
    """(human text, answer) of a single-turn record; answer is None if absent and not required."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise RecordError("expected 'conversations': a list of {'from': ..., 'value': <text>} turns")
    roles = [t.get("from") for t in turns]
    if roles and roles[0] != "human":  # the reference drops a leading non-human turn (e.g. "system")
        turns, roles = turns[1:], roles[1:]
    if roles not in (["human", "gpt"], ["human"]) or (require_answer and roles != ["human", "gpt"]):
        raise RecordError(f"expected one 'human' turn then one 'gpt' turn, found roles {roles}")
    answer = turns[1]["value"] if len(turns) == 2 else None
    if require_answer and not answer.strip():
        raise RecordError("empty answer (gpt turn)")
    if require_answer and AUDIO in answer:  # tokenised, it would become a placeholder and take another file's audio
        raise RecordError(f"the answer (gpt turn) contains '{AUDIO}'; only the human turn may hold placeholders")
    return turns[0]["value"], answer


def voice_paths(record, human: str) -> list[str]:
    """The record's audio paths, one per <audio> placeholder (a bare string counts as a one-element list)."""
    voice = record.get("voice")
    voice = [voice] if isinstance(voice, str) else voice
    if not isinstance(voice, list) or not voice or not all(isinstance(v, str) and v for v in voice):
        raise RecordError("expected 'voice': a non-empty list of audio paths (every LLaSO record has audio)")
    if human.count(AUDIO) != len(voice):
        raise RecordError(f"{human.count(AUDIO)} '{AUDIO}' placeholders in the human turn but {len(voice)} "
                          "'voice' files; they must match one to one")
    return voice


# ----- audio --------------------------------------------------------------------------------------------------------

SAMPLE_RATE = 16_000
CHUNK = 30 * SAMPLE_RATE  # 480,000 samples: one Whisper window
MAX_CHUNKS = 20  # 10 minutes per file, as the reference


def relative_audio_path(path: str) -> str:
    """A record's audio path ('/' and Windows '\\' mixed) as a relative POSIX path; RecordError if its words leave
    the audio root (absolute, a drive letter, '..' above the root; links inside the root may point anywhere)."""
    relative = path.replace("\\", "/")
    if relative.startswith("/") or re.match(r"[A-Za-z]:", relative) or \
            posixpath.normpath(relative).split("/")[0] == "..":
        raise RecordError(f"audio path '{path}' leaves the audio root (--audio-root): corpus paths must be relative "
                          "to it")
    return relative


def resolve_audio(audio_root, path: str) -> Path:
    """audio_root / the relative path; without a root ("" or None: files named on the command line) the path as is."""
    return Path(audio_root) / relative_audio_path(path) if audio_root else Path(path.replace("\\", "/"))


def load_audio(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz, as librosa.load in the reference (channel mean, soxr 'HQ'); RecordError if unusable."""
    if not path.is_file():
        raise RecordError(f"audio file not found: {path} (check --audio-root)")
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:  # libsndfile errors are RuntimeErrors
        raise RecordError(f"unreadable audio file {path}: {error}") from None
    if x.shape[0] == 0:
        raise RecordError(f"empty audio file (0 samples): {path}")
    x = x.mean(axis=1)
    if not np.isfinite(x).all():
        raise RecordError(f"audio file contains NaN or infinite samples: {path}")
    if sr != SAMPLE_RATE:
        # librosa.resample then fixes the length to ceil(n * 16000 / sr), zero-padding or cutting the end: soxr
        # alone rounds, often one sample shorter at 44.1 kHz (one chunk fewer with --compat-chunks at the edge)
        n = int(np.ceil(len(x) * (SAMPLE_RATE / sr)))
        x = soxr.resample(x, sr, SAMPLE_RATE, quality="HQ")
        x = np.pad(x[:n], (0, max(0, n - len(x))))
    return x.astype(np.float32, copy=False)


def split_chunks(x: np.ndarray, compat: bool = False, max_chunks: int = MAX_CHUNKS) -> tuple[list, int]:
    """(30 s chunks, number dropped beyond max_chunks): exact 480,000-sample chunks, or with compat the reference's
    480,001-sample slices (the feature extractor then cuts each to 480,000: one sample per full chunk is lost)."""
    step = CHUNK + 1 if compat else CHUNK
    chunks = [x[start : start + step] for start in range(0, len(x), step)]
    return chunks[:max_chunks], max(0, len(chunks) - max_chunks)


# ----- features -----------------------------------------------------------------------------------------------------

def log_mel(chunks: list, feature_extractor) -> np.ndarray:
    """[n_chunks, n_mels, 3000]: each chunk zero-padded (or cut) to 30 s before the STFT, as the reference."""
    features = feature_extractor(chunks, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=CHUNK,
                                 truncation=True, return_tensors="np")
    return features["input_features"].astype(np.float32, copy=False)


def audio_features(paths, feature_extractor, audio_root="", compat: bool = False, max_chunks: int = MAX_CHUNKS):
    """(log-mels [n_chunks, n_mels, 3000], chunks per file, real frames per chunk, what was cut) of audio files. Real
    frames, ceil(n / hop), have their STFT window centred inside the audio; --trim-audio encodes only those."""
    chunks, audio_chunks, cut = [], [], []
    for path in paths:
        file_chunks, dropped = split_chunks(load_audio(resolve_audio(audio_root, path)), compat, max_chunks)
        chunks += file_chunks
        audio_chunks.append(len(file_chunks))
        if dropped:
            cut.append(f"{path}: {dropped} chunk(s) of 30 s beyond {max_chunks} dropped")
    mels = log_mel(chunks, feature_extractor) if chunks else np.zeros((0, feature_extractor.feature_size, 3000),
                                                                       np.float32)
    frames = [min(feature_extractor.nb_max_frames, -(-len(c) // feature_extractor.hop_length)) for c in chunks]
    return mels, audio_chunks, frames, cut


# ----- dataset + batch ----------------------------------------------------------------------------------------------

class LLaSODataset:
    """Map-style dataset: record i → token ids, labels, log-mels of its audio. An unusable record comes back with
    "error" set (collate lists it under "skipped"); strict=True raises RecordError. eval_mode: no gold answer needed."""

    def __init__(self, corpus: Corpus, tokenizer, feature_extractor, audio_root, max_len: int = 2048,
                 eval_mode=False, strict=False, compat_chunks=False, max_chunks: int = MAX_CHUNKS):
        import model  # torch + transformers: only once records are tokenised
        self.corpus, self.tokenizer, self.feature_extractor = corpus, tokenizer, feature_extractor
        self.audio_root, self.max_len, self.eval_mode, self.strict = Path(audio_root), max_len, eval_mode, strict
        self.compat_chunks, self.max_chunks = compat_chunks, max_chunks
        self.tokenize, self.ignore = model.tokenize, model.IGNORE

    def __len__(self):
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict:
        file, record_no = self.corpus.locate(i)
        item = {"index": i, "file": str(file), "record_no": record_no, "record": None, "error": None, "cut": None,
                "n_mels": self.feature_extractor.feature_size}
        try:
            item["record"] = self.corpus.read(i)
            item.update(self.build(item["record"]))
        except RecordError as error:
            if self.strict:
                raise RecordError(f"{file} record {record_no}: {error}. Fix or remove the record, or run without "
                                  "--strict to skip such records.") from None
            item["error"] = str(error)
        return item

    def build(self, record: dict) -> dict:
        """Prompt ids, labels and log-mels of one parsed record; RecordError says why the record is unusable."""
        human, answer = conversation(record, require_answer=not self.eval_mode)
        voices = voice_paths(record, human)
        try:
            ids, labels = self.tokenize(self.tokenizer, human, None if self.eval_mode else answer, self.max_len)
        except ValueError as error:  # e.g. max_len cuts off an <audio> placeholder
            raise RecordError(f"cannot build the prompt: {error}") from None
        if not self.eval_mode and all(label == self.ignore for label in labels):
            raise RecordError(f"the prompt fills max_len={self.max_len} tokens; no answer token is left to learn")
        mels, audio_chunks, frames, cut = audio_features(voices, self.feature_extractor, self.audio_root,
                                                         self.compat_chunks, self.max_chunks)
        return {"input_ids": ids, "labels": labels, "mels": mels, "audio_chunks": audio_chunks,
                "audio_frames": frames, "cut": "; ".join(cut) or None}


def collate(items: list[dict]) -> dict:
    """The batch LLaSO.forward / generate take. Usable records: "input_ids", "labels" (lists of 1-D LongTensors), "mels"
    [total_chunks, n_mels, 3000], "audio_chunks" (chunks per audio file, in placeholder order), "audio_frames" (real
    frames per chunk, for --trim-audio), "records", "indices", "where" (file, record_no), "cut" [(file, record_no,
    what was cut)]. Dropped ones: "skipped" [(file, record_no, reason)], "skipped_records" (None if unparsable)."""
    import torch
    good = [it for it in items if it["error"] is None]
    bad = [it for it in items if it["error"] is not None]
    mels = [it["mels"] for it in good]
    return {
        "input_ids": [torch.tensor(it["input_ids"], dtype=torch.long) for it in good],
        "labels": [torch.tensor(it["labels"], dtype=torch.long) for it in good],
        "mels": torch.from_numpy(np.concatenate(mels)) if mels else torch.zeros(0, items[0]["n_mels"], 3000),
        "audio_chunks": torch.tensor([n for it in good for n in it["audio_chunks"]], dtype=torch.long),
        "audio_frames": torch.tensor([n for it in good for n in it["audio_frames"]], dtype=torch.long),
        "records": [it["record"] for it in good],
        "indices": [it["index"] for it in good],
        "where": [(it["file"], it["record_no"]) for it in good],
        "skipped": [(it["file"], it["record_no"], it["error"]) for it in bad],
        "skipped_records": [it["record"] for it in bad],
        "cut": [(it["file"], it["record_no"], it["cut"]) for it in good if it["cut"]],
    }


def make_loader(dataset: LLaSODataset, batches, num_workers: int = 4):
    """DataLoader over `batches` (a StepSampler, or any iterable of index lists); features are made in workers."""
    import torch
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


# ----- samplers -----------------------------------------------------------------------------------------------------
#
# An epoch's order is a pure function of (seed, epoch) — numpy's Generator seeded with [seed, epoch]. Global batch t
# (one optimizer step) = order[t*G : (t+1)*G] with G = micro_batch × world_size × grad_accum, whatever the number of
# ranks. The incomplete last one is dropped: every rank runs the same number of steps (else all-reduce would hang).

def shuffled_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Stage 1: a plain random permutation of the n records."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def grouped_order(lengths: np.ndarray, global_batch: int, seed: int, epoch: int, types=None) -> np.ndarray:
    """Stage 2: the reference's modality+length grouping (length = characters of all turns), one megabatch per optimizer
    step; each type's last megabatch, even a full one, goes to a leftover pool that comes last, sorted by index. Type:
    the reference's audio/image/text, one in LLaSO; types=corpus.configs() also splits by modality, unlike it."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths, dtype=np.int64)
    types = np.zeros(len(lengths), np.int8) if types is None else np.asarray(types)
    megabatches, leftover = [np.zeros((0, global_batch), np.int64)], [np.zeros(0, np.int64)]
    for t in np.unique(types):
        idx = np.flatnonzero(types == t)
        idx = idx[rng.permutation(len(idx))]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]  # longest first; ties keep the random order
        n_shuffled = (len(idx) - 1) // global_batch * global_batch  # all megabatches but the last
        megabatches.append(idx[:n_shuffled].reshape(-1, global_batch))
        leftover.append(idx[n_shuffled:])
    megabatches = np.concatenate(megabatches)
    return np.concatenate([megabatches[rng.permutation(len(megabatches))].ravel(), np.sort(np.concatenate(leftover))])


class StepSampler:
    """One rank's micro-batches of an epoch, from optimizer step `start_step` on (resuming reads no skipped record).
    Global batch t is cut into world_size × grad_accum micro-batches of micro_batch consecutive records; rank r takes
    r·grad_accum … (r+1)·grad_accum − 1, so 2 ranks × accum a and 1 rank × accum 2a run the same micro-batches."""

    def __init__(self, order: np.ndarray, micro_batch: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, start_step: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.order, self.grad_accum, self.rank, self.start_step = np.asarray(order), grad_accum, rank, start_step
        self.per_rank = micro_batch * grad_accum  # records of one rank per step
        self.global_batch = self.per_rank * world_size
        self.steps = len(self.order) // self.global_batch  # incomplete last global batch dropped
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's 0..{self.steps} steps")

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's grad_accum micro-batches of optimizer step `step`."""
        first = step * self.global_batch + self.rank * self.per_rank
        return self.order[first : first + self.per_rank].reshape(self.grad_accum, -1).tolist()

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield from self.micro_batches(step)

    def __len__(self):
        return (self.steps - self.start_step) * self.grad_accum


# ----- preflight CLI ------------------------------------------------------------------------------------------------

def check_audio(path: Path, decode: bool = False) -> None:
    """RecordError if the audio file is missing, unreadable or empty by its header; decode=True decodes it in full,
    as training does, and also finds data that does not decode, and NaN or infinite samples."""
    if decode or not path.is_file():  # load_audio says what is wrong
        load_audio(path)
        return
    try:
        frames = sf.info(path).frames
    except (RuntimeError, OSError) as error:
        raise RecordError(f"unreadable audio file {path}: {error}") from None
    if frames == 0:
        raise RecordError(f"empty audio file (0 samples): {path}")


def preflight(paths, audio_root=None, cache_dir=None, max_listed=50, out=sys.stdout, decode=False) -> int:
    """Print records per file and modality configuration, and every problem found; return the exit code. Records
    are checked as the dataset checks them (not tokenised), audio files when audio_root is given (check_audio)."""
    try:
        corpus = Corpus(paths, cache_dir)
    except CorpusError as error:
        print(f"error: {error}", file=out)
        return 2
    problems = Counter()

    def report(kind, path, record_no, reason):
        problems[kind] += 1
        if problems.total() <= max_listed:
            print(f"{kind}: {path} record {record_no}: {reason}", file=out)

    def table_row(configs, what):  # records per config code: unusable (-1) last
        counts = np.bincount(configs.astype(np.int64) + 1, minlength=len(CONFIGS) + 1)
        print(f"{counts.sum():>10} " + " ".join(f"{n:>8}" for n in counts[1:]) + f" {counts[0]:>8}  {what}", file=out)

    print(f"{'records':>10} " + " ".join(f"{c:>8}" for c in CONFIGS) + f" {'unusable':>8}  file", file=out)
    for path, index in zip(corpus.files, corpus.indexes):
        table_row(index["config"], path)
        with open(path, "rb") as f:
            for record_no, row in enumerate(index):  # one record at a time, front to back: memory stays flat
                f.seek(int(row["offset"]))
                try:
                    record = parse_record(f.read(int(row["length"])))
                    voices = voice_paths(record, conversation(record)[0])
                except RecordError as error:
                    report("malformed", path, record_no, error)
                    continue
                for voice in voices:
                    try:  # a path that leaves the root is found without --audio-root too
                        relative = relative_audio_path(voice)
                        if audio_root is not None:
                            check_audio(Path(audio_root) / relative, decode)
                    except RecordError as error:
                        report("audio", path, record_no, error)
    table_row(corpus.configs(), f"total ({len(corpus.files)} files)")
    if problems.total() > max_listed:
        print(f"... only the first {max_listed} problems are listed", file=out)
    checked = "audio files not checked (no --audio-root)" if audio_root is None else \
        "audio check: every file decoded" if decode else "audio check: headers only (--decode decodes every file)"
    print(f"malformed records: {problems['malformed']}, audio problems: {problems['audio']}; {checked}", file=out)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Index LLaSO corpora and check them before a run.")
    parser.add_argument("corpus", nargs="+", help="corpus JSON/JSONL files or folders (searched recursively)")
    parser.add_argument("--audio-root", help="folder the 'voice' paths are relative to; checks that every file opens")
    parser.add_argument("--decode", action="store_true", help="decode every audio file in full (slow): also finds "
                        "NaN/infinite samples and data that does not decode; default: headers only")
    parser.add_argument("--cache-dir", help=f"where to keep indexes if not beside the corpus (default: beside it "
                        f"if writable, else {DEFAULT_CACHE_DIR})")
    parser.add_argument("--max-listed", type=int, default=50, help="problems printed in full")
    args = parser.parse_args(argv)
    if args.decode and args.audio_root is None:
        parser.error("--decode needs --audio-root")
    return preflight(args.corpus, args.audio_root, args.cache_dir, args.max_listed, decode=args.decode)


if __name__ == "__main__":
    sys.exit(main())
