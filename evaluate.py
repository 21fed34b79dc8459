r"""LLaSO-Eval for llaso-mini: greedy answers to every test file, then their scores; and one-off answers.

Generation, then scoring of --out (README "evaluate.py": decoding, batching, precision, resuming, bad records):

    python evaluate.py --preset tiny                                   # sample eval set, out/instruct -> out/eval
    python evaluate.py --ckpt out/instruct --data LLaSO-Eval --audio-root /data/llaso --out results/llaso-mini
    python evaluate.py --ckpt LLaSO-Base-3.8B-Instruct --encoder openai/whisper-large-v3 \
        --data LLaSO-Eval --audio-root /data/llaso --out results/llaso-base       # the released checkpoint
    torchrun --nproc_per_node=8 evaluate.py --ckpt ... --data ... --audio-root ... --out ...   # one node, 8 GPUs

One record, printing the answer (a prompt without <audio> gets it appended; put it first for the (a,t) form):

    python evaluate.py --ckpt out/instruct --audio question.wav --prompt "Answer the question."   # (t,a)
    python evaluate.py --ckpt out/instruct --audio question.wav                                 # (a): turn = <audio>
    python evaluate.py --ckpt out/instruct --prompt "What is the capital of France?"              # text only

Scoring directories of prediction files (README "Scoring": file layout, every rule of both modes, the judge):

    python evaluate.py --score results/llaso-mini                      # correct metrics (default)
    python evaluate.py --score results/qwen2-audio --compat llaso      # the reference scripts' numbers, quirks included
    python evaluate.py --score results/qwen2-audio --compat standard   # default, but WER/CER/PER un-normalised
    python evaluate.py --score results/A results/B results/C           # + normalised score across the three
    OPENAI_API_KEY=... python evaluate.py --score results/A --judge-url https://api.openai.com/v1/chat/completions
"""
import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import unicodedata
import urllib.request
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import jiwer

SAMPLE = Path(__file__).resolve().parent / "sample"  # bundled sample corpus (--preset tiny)
AUDIO = "<audio>"  # same placeholder as model.AUDIO; not imported, so scoring needs neither torch nor transformers


# ----- task catalogue of LLaSO-Eval's 44 files: file stem without "_test" -> (task, category, kind) -----------------

LING, SEM, SPK, MUS = "linguistic", "semantic", "paralinguistic (speaker)", "paralinguistic (music)"
QA_SOURCES = ("alpacaDan", "dolly", "orca", "tigerbot_alpaca", "tigerbot_multichat", "unnatural")
CATALOGUE = {
    "ASR": ("ASR", LING, "asr"),
    "phoneme_recognition": ("phoneme recognition", LING, "per"),
    **{f"pronunciation_scoring_{s}_level": ("pronunciation scoring", LING, "pron") for s in ("sentence", "word")},
    **{f"{s}_{c}": ("open-ended QA", SEM, "judge") for s in QA_SOURCES for c in ("input_1", "instruction_0")},
    **{s: ("open-ended QA", SEM, "judge") for s in ("1M_GPT4_end", "3.5M_GPT3.5_end", "alpaca_gpt4_end",
                                                     "code_alpaca_end")},
    "slurp_Intent_Prediction": ("intent prediction", SEM, "judge+acc"),
    "slurp_Entity_Extraction": ("entity extraction", SEM, "judge"),
    "speechcommand_recognition": ("speech command", SEM, "judge+acc"),
    **{f"{c}_gender_classification": ("gender", SPK, "acc")
       for c in ("common-voice", "vctk", "voxceleb", "vocalsound")},
    **{f"{c}_age_classification": ("age classification", SPK, "acc") for c in ("common-voice", "vctk")},
    "vocalsound_age_prediction": ("age prediction", SPK, "age"),
    **{f"{c}_classification": ("accent", SPK, "acc") for c in ("accentdb_AI", "common-voice_accent", "vctk_accent")},
    **{f"{c}_ER_classification": ("emotion recognition", SPK, "acc") for c in ("CREMAD", "meld")},
    **{f"{c}_EIE_classification": ("emotion intensity", SPK, "acc") for c in ("CREMAD", "meld")},
    "meld_SV_classification": ("speaker verification", SPK, "acc"),
    "Synthetic_Audio_Classification": ("synthetic speech detection", SPK, "acc"),
    "vocalsound_vocal_classification": ("vocal sound", SPK, "acc"),
    "NSynth_instrument_classification": ("instrument", MUS, "acc"),
    "NSynth_music_source_classification": ("instrument source", MUS, "acc"),
    "NSynth_pitch_recognition": ("pitch", MUS, "pitch"),
    "velocity_classification": ("velocity", MUS, "acc"),
}
PRIMARY = {"asr": ("wer", "cer"), "per": ("per",), "pron": ("judge_mean",), "judge": ("judge_mean",),
           "judge+acc": ("judge_mean",), "acc": ("accuracy", "abstention_pct"), "age": ("mae",), "pitch": ("mae",)}
JUDGED = {"pron", "judge", "judge+acc"}
LOWER_IS_BETTER = {"wer", "cer", "per", "mae"}
METRICS = ["wer", "cer", "per", "accuracy", "abstention_pct", "mae", "judge_mean"]  # column order of every table


def task_of(stem, rows):
    """(task, category, kind); a stem outside the catalogue gets a kind guessed from its name, then from its golds."""
    base = stem.removesuffix("_test")
    if base in CATALOGUE:
        return CATALOGUE[base]
    s = base.lower()
    by_name = [("phoneme", "per"), ("pronunciation", "pron"), ("age_prediction", "age"), ("pitch", "pitch"),
               ("classification", "acc")]
    kind = "asr" if s.startswith("asr") else next((k for word, k in by_name if word in s), None)
    if kind is None and s.endswith(("_end", "_input_1", "_instruction_0")):
        kind = "judge"
    if kind is None:  # a small set of short golds looks like a closed label set, anything else goes to the judge
        labels = {label_norm(row.gold) for row in rows}
        kind = "acc" if len(labels) <= min(50, len(rows) / 2) and all(len(l.split()) <= 3 for l in labels) else "judge"
    return "unknown", "unknown", kind


def modality(stem, humans):
    """(t,a), (a,t) or (a): QA files name it by suffix (_input_1 text instruction + audio input, _instruction_0 spoken
    instruction + text input, _end audio only); other files by where <audio> sits in the human turns."""
    for suffix, config in (("_end", "(a)"), ("_instruction_0", "(a,t)"), ("_input_1", "(t,a)")):
        if stem.endswith(suffix):
            return config
    if humans and all(h.strip() == AUDIO for h in humans):
        return "(a)"
    audio_first = sum(h.lstrip().startswith(AUDIO) for h in humans)
    return "(a,t)" if audio_first > len(humans) / 2 else "(t,a)"


# ----- prediction files ---------------------------------------------------------------------------------------------

PREDICTION_KEYS = ("answer", "prediction", "result")  # LLaSO / SALMONN, LLaMA-Omni / GLM-4-Voice, Mini-Omni, Typhoon
PREDICTION_SUFFIXES = (".json", ".jsonl")
JSON_TYPES = {dict: "a JSON object", list: "a JSON list", bool: "a JSON boolean", int: "a JSON number",
              float: "a JSON number", type(None): "null"}


class Row(NamedTuple):
    index: int  # the record's position in its file: judge verdicts are keyed by it
    human: str
    gold: str
    prediction: str


class Predictions(NamedTuple):
    rows: list  # the records that are scored, in file order
    errors: list  # "<file> record <i>: reason" of error entries and of answers that are not text: scored as ""
    unscorable: list  # "<file> record <i>: reason" of records without a usable gold: left out of every metric


class NothingToScore(Exception):
    """A results folder without a single prediction file: scores of nothing would look like a success."""


def prediction_files(results_dir):
    """stem -> paths of the *.json / *.jsonl prediction files with that stem (one, unless both layouts are there)."""
    found = {}
    for path in sorted(results_dir.iterdir()):
        if path.suffix in PREDICTION_SUFFIXES and path.is_file() and path.name != "scores.json":
            found.setdefault(path.stem, []).append(path)
    if found:
        return found
    instead = []  # what the folder holds instead, and where prediction files may be (a subfolder per model, say)
    for path in sorted(results_dir.iterdir()):
        inside = sum(f.suffix in PREDICTION_SUFFIXES for f in path.iterdir()) if path.is_dir() else None
        instead.append(path.name if inside is None else f"{path.name}/ ({inside} prediction file{'s' * (inside != 1)})")
    raise NothingToScore(f"{results_dir}: no prediction files (<stem>_test.json lists or <stem>_test.jsonl, one record "
                         f"a line) to score; found instead: {', '.join(instead[:20]) or 'nothing'}"
                         f"{' ...' * (len(instead) > 20)}")


def read_records(path):
    """A JSON list (as generation writes, even under a .jsonl name) or JSONL, told apart by the first character."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path.name}: not UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"{path.name}: empty file")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name}: not a readable JSON file ({error})") from None
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 and kin may sit inside strings
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name} line {number}: not a JSON record ({error}); expected a JSON list of "
                                 "records, or JSONL: one record a line") from None
    return records


def load_results(path):
    """Predictions of one file (an answer that is not a string is an error entry); ValueError names file and record."""
    rows, errors, unscorable = [], [], []
    for i, record in enumerate(read_records(path)):
        where = f"{path.name} record {i}"
        failed = isinstance(record, dict) and record.get("error")
        if failed:
            errors.append(str(record["error"]))
        try:
            human, gold = record["conversations"][0]["value"], record["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            if failed:
                unscorable.append(f"{where}: no gold answer (the record could not be read)")
                continue
            raise ValueError(f"{where}: expected 'conversations' = [human turn, gpt turn]") from None
        if not isinstance(gold, str) or not gold.strip():
            unscorable.append(f"{where}: the gold answer is {'empty' if isinstance(gold, str) else not_text(gold)}")
            continue
        key = next((k for k in PREDICTION_KEYS if k in record), None)
        if key is None:
            raise ValueError(f"{where}: no prediction field (one of {', '.join(PREDICTION_KEYS)})")
        prediction = record[key]
        if not isinstance(prediction, str):
            if not failed:
                errors.append(f"{where}: the answer is {not_text(prediction)}")
            prediction = ""
        human = human if isinstance(human, str) else ""  # read only to tell the modality configuration
        rows.append(Row(i, human, gold, prediction))
    return Predictions(rows, errors, unscorable)


def not_text(value):
    return f"{JSON_TYPES.get(type(value), type(value).__name__)}, not a string"


# ----- WER / CER (ASR) ----------------------------------------------------------------------------------------------

RAW_WORDS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
RAW_CHARS = jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfChars()])


def normalize_text(text):
    """Default English normalisation: lowercase, drop punctuation except apostrophes, collapse whitespace."""
    text = text.lower().replace("\u2019", "'")
    text = "".join(" " if unicodedata.category(c).startswith("P") and c != "'" else c for c in text)
    return " ".join(text.split())


def error_rate(out):
    """Corpus Σ(S+D+I) / Σ reference tokens; None if no reference has a token (jiwer would return a raw count)."""
    reference_tokens = out.hits + out.substitutions + out.deletions
    errors = out.substitutions + out.deletions + out.insertions
    return errors / reference_tokens if reference_tokens else None


def wer_cer(golds, preds, compat):
    refs, hyps = (preds, golds) if compat == "llaso" else (golds, preds)  # llaso: the reference's role swap, on purpose
    if compat is None:
        refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    # jiwer 4 accepts empty strings: an empty hypothesis aligns as all deletions, an empty reference as insertions
    w = jiwer.process_words(refs, hyps, reference_transform=RAW_WORDS, hypothesis_transform=RAW_WORDS)
    c = jiwer.process_characters(refs, hyps, reference_transform=RAW_CHARS, hypothesis_transform=RAW_CHARS)
    result = {"wer": error_rate(w), "cer": error_rate(c), "empty_predictions": sum(not p.strip() for p in preds),
              "empty_golds": sum(not g.strip() for g in golds)}
    if compat == "llaso" and result["empty_predictions"]:
        result["note"] = "the reference scripts raise on an empty answer; here it counts as an empty reference"
    return result


# ----- PER (phoneme recognition; golds are IPA) ---------------------------------------------------------------------

# Reference: letters go through a TIMIT 61->39 index table that, for ASCII letters, merges {A,D} {C,F,G} {H,W} {K,N,V}
TIMIT_LETTER = {"D": "A", "F": "C", "G": "C", "W": "H", "N": "K", "V": "K"}
STRESS_MARKS = {"\u02c8", "\u02cc"}  # ˈ ˌ
TIE_BARS = {"\u0361", "\u035c"}


def timit_letters(text):
    return [TIMIT_LETTER.get(c, c) for c in text.upper() if "A" <= c <= "Z"]


def ipa_phones(text):
    """NFC, no whitespace or stress; a phone = base character + following length marks / diacritics / tied char."""
    phones = []
    for c in unicodedata.normalize("NFC", text):
        if c.isspace() or c in STRESS_MARKS:
            continue
        attaches = unicodedata.category(c) in ("Mn", "Lm") or (phones and phones[-1][-1] in TIE_BARS)
        if attaches and phones:
            phones[-1] += c
        else:
            phones.append(c)
    return phones


def phone_error_rate(golds, preds, compat):
    if compat in ("llaso", "standard"):  # per-utterance rate, mean over utterances
        rates = []
        for gold, pred in zip(golds, preds):
            g, p = timit_letters(gold), timit_letters(pred)
            out = jiwer.process_words(" ".join(g), " ".join(p))  # letters as words: edits of the letter sequences
            edits = out.substitutions + out.deletions + out.insertions
            denominator = p if compat == "llaso" else g  # llaso: divides by the answer side (role swap as in WER)
            rates.append(edits / len(denominator) if denominator else float(bool(g or p)))
        return {"per": statistics.fmean(rates) if rates else None}
    refs = [" ".join(ipa_phones(g)) for g in golds]
    hyps = [" ".join(ipa_phones(p)) for p in preds]
    out = jiwer.process_words(refs, hyps, reference_transform=RAW_WORDS, hypothesis_transform=RAW_WORDS)
    return {"per": error_rate(out), "empty_predictions": sum(not h for h in hyps)}


# ----- closed-set accuracy and abstention ---------------------------------------------------------------------------

def label_norm(text):
    return text.strip().lower().rstrip(". ").strip()


def labels_named(prediction, labels, nested=True):
    """Labels named at word boundaries ("male" is not in "female"); one found only inside a longer named label ("irish"
    in "northern irish") is part of it, not a second label, unless nested=False (as the reference counts)."""
    text = prediction.strip().lower()
    spans = {l: [m.span() for m in re.finditer(rf"(?<![a-z0-9]){re.escape(l)}(?![a-z0-9])", text)] for l in labels}
    spans = {l: found for l, found in spans.items() if found}
    if not nested:
        return set(spans)
    every = [span for found in spans.values() for span in found]

    def inside_longer(a, b):
        return any(c <= a and b <= d and d - c > b - a for c, d in every)

    return {l for l, found in spans.items() if not all(inside_longer(a, b) for a, b in found)}


def accuracy(golds, preds, compat):
    if compat == "llaso":  # reference rule: exact, or gold is the only label that is a substring ("male" ⊂ "female")
        labels = {g.replace(".", "").lower() for g in golds}
        correct = 0
        for gold, pred in zip(golds, preds):
            t, p = gold.replace(".", "").lower(), pred.replace(".", "").lower()
            correct += t == p or (t in p and not any(l != t and l in p for l in labels))
    else:
        labels = {label_norm(g) for g in golds} - {""}
        correct = sum(labels_named(p, labels) == {label_norm(g)} for g, p in zip(golds, preds))
    return {"accuracy": correct / len(golds)}


def abstention(golds, preds, compat):
    """Percent of answers that do not name exactly one label of the file (format compliance, not correctness)."""
    labels = {label_norm(g) for g in golds} - {""}
    follows = sum(len(labels_named(p, labels, nested=compat != "llaso")) == 1 for p in preds)
    rate = (len(preds) - follows) / len(preds) * 100
    return {"abstention_pct": round(rate, 4) if compat == "llaso" else rate}


# ----- MAE (age prediction, pitch) ----------------------------------------------------------------------------------

def first_or_range(numbers, text):
    """Reference rule: "20-30" -> mean of the first two numbers, otherwise the first number."""
    return statistics.fmean(numbers[:2]) if "-" in text and len(numbers) >= 2 else numbers[0]


def parse_age(text):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if numbers:
        return int(round(first_or_range(numbers, text)))  # Python round: half to even, as in the reference
    return 22 if "adult" in text.lower() else None  # reference heuristic, kept in both modes


def parse_pitch(text):
    """A MIDI note (an integer): the text as an integer, else the nearest integer to the text as a float, to its first
    number or to a range's midpoint "60-64" (half to even, both modes, as the reference); None without a number."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return int(round(float(text)))
    except (ValueError, OverflowError):  # not a number, "nan" or "inf"
        pass
    numbers = re.findall(r"\d+\.?\d*", text)
    return int(round(first_or_range([float(n) for n in numbers], text))) if numbers else None


def mae(golds, preds, compat, kind):
    parse = parse_age if kind == "age" else parse_pitch
    errors, unparsed_pred, unparsed_gold, out_of_range = [], 0, 0, 0
    for gold, pred in zip(golds, preds):
        g, p = parse(gold), parse(pred)
        unparsed_gold += g is None
        unparsed_pred += p is None
        if g is None or p is None:
            continue
        if kind == "pitch" and not (0 <= g <= 127 and 0 <= p <= 127):
            out_of_range += 1
            continue
        errors.append(abs(g - p))
    value = statistics.fmean(errors) if errors else None
    if compat == "llaso" and kind == "age" and value is not None:
        value = round(value, 2)
    # drops flatter a model that abstains, so coverage is always reported next to the MAE
    return {"mae": value, "n_used": len(errors), "n_dropped": len(golds) - len(errors),
            "coverage": len(errors) / len(golds), "unparseable_predictions": unparsed_pred,
            "unparseable_golds": unparsed_gold, "out_of_range": out_of_range}


# ----- pronunciation scoring: regex agreement of the three sentence-level scores ------------------------------------

PRON_NAMES = {"accuracy": "accuracy", "proso": "prosodic", "fluency": "fluency"}
PRON_NAMED_FIRST = re.compile(r"(accuracy|proso|fluency).*?(?:is|:|=|as).*?(\d+)")
PRON_NUMBER_FIRST = re.compile(r"(\d+)\s*?(?:for)\s*?(accuracy|proso|fluency)")


def parse_pron(text):
    text = text.lower()
    scores = {PRON_NAMES[m[1]]: int(m[2]) for m in PRON_NAMED_FIRST.finditer(text)}  # later matches overwrite
    if len(scores) != 3:
        scores = {PRON_NAMES[m[2]]: int(m[1]) for m in PRON_NUMBER_FIRST.finditer(text)}
    return scores if len(scores) == 3 else None


def pron_agreement(golds, preds):
    """Exact agreement per aspect over the items where gold and answer both parse (reference output names)."""
    pairs = [(g, p) for g, p in ((parse_pron(g), parse_pron(p)) for g, p in zip(golds, preds)) if g and p]
    names = {"accuracy": "accuracy", "prosodic_accuracy": "prosodic", "fluency_accuracy": "fluency"}
    agreement = {name: sum(g[a] == p[a] for g, p in pairs) / len(pairs) if pairs else 0.0 for name, a in names.items()}
    return {"pron_agreement": {**agreement, "matched_entries": len(pairs), "total_entries": len(golds)}}


# ----- LLM judge: verdicts in gpt_result/<stem>.jsonl, one line {file, index, predicted, reference, evaluation} -----

JUDGE_SYSTEM = (
    "You are evaluating the performance of an AI assistant in an audio question answering task.\n"
    "Given a **Reference Answer** and a **Predicted Answer**, "
    "assign a score from 1 to 5 based on Relevance & Accuracy.\n"
    "Output format (exactly, no other text):\n"
    "Score: <integer 1-5>\n"
    "Explanation: <concise justification focusing on both relevance and accuracy>\n")
JUDGE_USER = ("**Reference Answer:**\n{reference}\n\n**Predicted Answer:**\n{predicted}\n\n"
              "Please produce the evaluation.")
SCORE = re.compile(r"Score:\**\s*(\d+)", re.IGNORECASE)  # \s also spans a newline: "Score:\n4"


def json_object(text):
    try:
        value = json.loads(text, strict=False)  # strict=False: a rejoined line holds a raw newline inside a string
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def read_verdicts(path):
    """index -> verdict; a verdict line broken in two by a raw newline is joined back with the next line."""
    verdicts, pending = {}, ""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    for line in filter(str.strip, lines):
        verdict = json_object(pending + line)
        if verdict is None and pending and (verdict := json_object(line)) is not None:
            print(f"warning: {path}: unparseable text ignored: {pending[:80]!r}", file=sys.stderr)
        if verdict is None:
            pending += line
            continue
        pending = ""
        verdicts[verdict.get("index")] = verdict
    if pending:
        print(f"warning: {path}: unparseable text ignored: {pending[:80]!r}", file=sys.stderr)
    return verdicts


def verdict_score(verdict):
    match = SCORE.search(str(verdict.get("evaluation", "")))
    return int(match[1]) if match else None


def judge_means(verdicts, rows, compat):
    """Mean verdict; default: only verdicts on the record's current answer, looked up by the record's index."""
    if compat == "llaso":  # reference: mean of every verdict on file
        scores = [s for s in map(verdict_score, verdicts.values()) if s is not None]
        return {"judge_mean": statistics.fmean(scores) if scores else None, "judge_n": len(scores)}
    scores, stale, unparsed = [], 0, 0
    for row in rows:
        verdict = verdicts.get(row.index)
        if verdict is None:
            continue
        score = verdict_score(verdict)
        if verdict.get("predicted", row.prediction.strip()) != row.prediction.strip():
            stale += 1  # judged an older prediction: not this model's answer any more
        elif score is None or not 1 <= score <= 5:
            unparsed += 1
        else:
            scores.append(score)
    return {"judge_mean": statistics.fmean(scores) if scores else None, "judge_n": len(scores),
            "judge_coverage": len(scores) / len(rows), "judge_unparsed": unparsed, "judge_stale": stale}


class JudgeError(Exception):
    """The judge run cannot go on (every further request would fail the same way)."""


def origin(url):
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib copies every header, the API key included, to wherever a redirect points: follow only same-origin
    redirects (scheme, host and port unchanged)."""

    def redirect_request(self, request, fp, code, msg, headers, new_url):
        if origin(new_url) != origin(request.full_url):
            fp.close()
            where = urlsplit(new_url)
            raise JudgeError(f"the judge URL {request.full_url} redirected ({code}) to {where.scheme}://"
                             f"{where.netloc}: refused, the API key goes to the host of --judge-url only; pass the "
                             "final URL instead")
        return super().redirect_request(request, fp, code, msg, headers, new_url)


JUDGE_OPENER = urllib.request.build_opener(SameOriginRedirects)


def ask_judge(url, key, model, temperature, reference, predicted, timeout=120):
    body = {"model": model, "temperature": temperature, "max_tokens": 4096,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": JUDGE_USER.format(reference=reference, predicted=predicted)}]}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}", "api-key": key}  # OpenAI / Azure
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with JUDGE_OPENER.open(request, timeout=timeout) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def judge_file(results_dir, path, rows, url, key, model, temperature):
    """Ask the judge about every record without a verdict on its current answer; appends to gpt_result/<stem>.jsonl."""
    verdicts_path = results_dir / "gpt_result" / f"{path.stem}.jsonl"
    verdicts = read_verdicts(verdicts_path)
    todo = [row for row in rows if verdicts.get(row.index, {}).get("predicted") != row.prediction.strip()]
    verdicts_path.parent.mkdir(exist_ok=True)
    failed = unparsed = 0
    with verdicts_path.open("a", encoding="utf-8", buffering=1) as f:  # line-buffered: each verdict is kept at once
        for row in todo:
            reference, predicted = row.gold.strip(), row.prediction.strip()
            try:
                evaluation = ask_judge(url, key, model, temperature, reference, predicted)
            except (OSError, KeyError, IndexError, ValueError) as error:  # URLError and HTTPError are OSErrors
                print(f"judge failed on {path.name} record {row.index}: {error}", file=sys.stderr)
                failed += 1  # not written, so the next run retries it
                continue
            verdict = {"file": path.name, "index": row.index, "predicted": predicted, "reference": reference,
                       "evaluation": evaluation}
            unparsed += verdict_score(verdict) is None
            f.write(json.dumps(verdict, ensure_ascii=False) + "\n")
    print(f"judge {path.stem}: {len(todo) - failed} new verdicts, {failed} failed, {unparsed} without a score")


# ----- scoring a directory ------------------------------------------------------------------------------------------

def score_file(results_dir, stem, rows, compat):
    task, category, kind = task_of(stem, rows)
    humans, golds, preds = [r.human for r in rows], [r.gold for r in rows], [r.prediction for r in rows]
    entry = {"task": task, "category": category, "modality": modality(stem.removesuffix("_test"), humans), "kind": kind,
             "primary": PRIMARY[kind][0], "n": len(rows)}
    if not rows:
        return entry
    text_metrics = {"asr": [wer_cer], "per": [phone_error_rate], "acc": [accuracy, abstention], "judge+acc": [accuracy]}
    for metric in text_metrics.get(kind, []):
        entry.update(metric(golds, preds, compat))
    if kind in ("age", "pitch"):
        entry.update(mae(golds, preds, compat, kind))
    if kind == "pron":
        entry.update(pron_agreement(golds, preds))
    if kind in JUDGED:
        entry.update(judge_means(read_verdicts(results_dir / "gpt_result" / f"{stem}.jsonl"), rows, compat))
    return entry


def mean_of(entries, key):
    values = [e[key] for e in entries if e.get(key) is not None]
    return statistics.fmean(values) if values else None


def group_table(files, field, keys):
    """Unweighted mean over files of each file's primary metrics, grouped by task / category / modality."""
    table = {}
    for name in sorted({e[field] for e in files.values()}):
        entries = [e for e in files.values() if e[field] == name]
        row = table[name] = {"files": len(entries), "n": sum(e["n"] for e in entries)}
        for key in keys:
            value = mean_of([e for e in entries if key in PRIMARY[e["kind"]]], key)
            if value is not None:
                row[key] = value
    return table


def summarize(files):
    """Means over the files whose primary metric it is (closed-set accuracy: the 19 ACC files, not intent)."""
    def of(*kinds):
        return [e for e in files.values() if e["kind"] in kinds]

    summary = {"n_files": len(files), "n_items": sum(e["n"] for e in files.values()),
               "errors": sum(e.get("errors", 0) for e in files.values()) or None,
               "unscorable": sum(e.get("unscorable", 0) for e in files.values()) or None,
               "wer": mean_of(of("asr"), "wer"), "cer": mean_of(of("asr"), "cer"), "per": mean_of(of("per"), "per"),
               "accuracy": mean_of(of("acc"), "accuracy"), "abstention_pct": mean_of(of("acc"), "abstention_pct"),
               "judge_mean": mean_of(of(*JUDGED), "judge_mean"),
               "open_ended_judge_mean": mean_of([e for e in of("judge") if e["task"] == "open-ended QA"], "judge_mean"),
               # one MAE per file: years and semitones do not average
               "mae": {stem: e["mae"] for stem, e in files.items() if e["kind"] in ("age", "pitch")}}
    return {key: value for key, value in summary.items() if value not in (None, {})}


LISTED = 10  # records named per file in scores.md and per kind on the terminal; scores.json lists them all
RECORD_LISTS = (  # (count key, list key, what they are) in each file's scores
    ("errors", "error_records", "could not be evaluated (error entries or answers that are not text; scored as empty "
                                "answers)"),
    ("unscorable", "unscorable_records", "left out of every metric (no usable gold)"))


def n_records(n):
    return f"{n} record{'s' * (n != 1)}"


def listing(records, sep="; ", more="and {} more (all in scores.json)", limit=LISTED):
    """The first `limit` records, then how many more there are."""
    return sep.join(records[:limit] + [more.format(len(records) - limit)] * (len(records) > limit))


def score_directory(results_dir, compat=None, judge=None):
    """Score every prediction file in results_dir -> scores dict (also the content of scores.json)."""
    results_dir = Path(results_dir)
    files, notes, skipped = {}, [], []
    for stem, paths in prediction_files(results_dir).items():
        try:
            if len(paths) > 1:
                raise ValueError(f"{stem}: two prediction files, {paths[0].name} and {paths[1].name}: keep one")
            predictions = load_results(paths[0])
        except ValueError as error:  # one broken file must not hide the others' scores
            skipped.append(str(error))
            notes.append(f"skipped {error}")
            print(f"error: {results_dir}/{error}", file=sys.stderr)
            continue
        rows, errors, unscorable = predictions
        if judge and task_of(stem, rows)[2] in JUDGED:
            judge_file(results_dir, paths[0], rows, **judge)
        entry = files[stem] = score_file(results_dir, stem, rows, compat)
        for (count, key, what), records in zip(RECORD_LISTS, (errors, unscorable)):
            if records:  # counted and listed: the records not scored as given
                entry[count], entry[key] = len(records), records
                notes.append(f"`{stem}`: {n_records(len(records))} {what}: {listing(records)}")
        if entry["kind"] in JUDGED and not entry.get("judge_n"):
            notes.append(f"`{stem}`: no judge verdicts in gpt_result/{stem}.jsonl (run with --judge-url)")
        if entry["task"] == "unknown":
            notes.append(f"`{stem}` is not a LLaSO-Eval file: scored as `{entry['kind']}` (inferred from its name and "
                         "golds)")
    keys = [k for k in METRICS if k != "mae"]  # MAE per task only: years and semitones do not average
    return {"mode": compat or "default", "files": files, "summary": summarize(files),
            "tasks": group_table(files, "task", keys + ["mae"]), "categories": group_table(files, "category", keys),
            "modalities": group_table(files, "modality", keys), "notes": notes, "skipped": skipped}


# ----- normalised score across models and output files --------------------------------------------------------------

def normalized_scores(scores_by_model):
    """llaso-mini's recipe (the paper's formula is not public): each test file's primary metric, min-max normalised
    across the directories that all scored it (lower-is-better inverted, ties skipped), averaged per model."""
    models = list(scores_by_model)
    shared = set.intersection(*(set(s["files"]) for s in scores_by_model.values()))
    points = {m: [] for m in models}  # every file used adds one point to each model
    for stem in sorted(shared):
        key = scores_by_model[models[0]]["files"][stem]["primary"]
        values = {m: scores_by_model[m]["files"][stem].get(key) for m in models}
        if any(v is None for v in values.values()) or max(values.values()) == min(values.values()):
            continue  # unscored somewhere, or a tie that carries no information
        low, high = min(values.values()), max(values.values())
        for m, v in values.items():
            x = (v - low) / (high - low)
            points[m].append(1 - x if key in LOWER_IS_BETTER else x)
    return {m: statistics.fmean(p) if p else None for m, p in points.items()}, len(points[models[0]])


NORMALIZED_NOTE = ("llaso-mini recipe (min-max per file across this pool, lower-is-better inverted, mean over files); "
                   "the paper's formula is not public: not comparable with the paper's 0.72")


def fmt(value):
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def md_table(rows, columns, first="name"):
    """A Markdown table, its columns padded so that it also reads on a terminal."""
    cells = [[first] + list(columns)] + [[str(name)] + [fmt(row.get(c)) for c in columns] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines[:1] + ["|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:])


def scores_markdown(title, scores):
    group_cols = ["files", "n"] + [k for k in METRICS if k != "mae"]  # MAE units differ
    files = {stem: {**e, "coverage": e.get("coverage", e.get("judge_coverage"))} for stem, e in scores["files"].items()}
    summary = {k: v for k, v in scores["summary"].items() if k != "mae"}
    parts = [f"# Scores: {title}", f"Mode: **{scores['mode']}** (README, Scoring). Rates are fractions, "
             "abstention in percent, MAE with coverage = items used / items.",
             "## Summary", md_table({k: {"value": v} for k, v in summary.items()}, ["value"], "metric"),
             "## Files", md_table(files, ["task", "modality", "n"] + METRICS + ["coverage"], "file"),
             "## Tasks", md_table(scores["tasks"], ["files", "n"] + METRICS, "task"),
             "## Categories", md_table(scores["categories"], group_cols, "category"),
             "## Modalities", md_table(scores["modalities"], group_cols, "modality")]
    if "normalized_score" in scores["summary"]:
        ns = scores["summary"]["normalized_score"]
        parts += ["## Normalised score", f"{fmt(ns['value'])} over {ns['files_used']} files, pool: "
                  f"{', '.join(ns['pool'])}. {NORMALIZED_NOTE}."]
    if scores["notes"]:
        parts += ["## Notes"] + [f"- {n}" for n in scores["notes"]]
    return "\n\n".join(parts) + "\n"


def write_atomic(path: Path, text: str):
    """A crash (or a full disk) leaves the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def score_directories(dirs, compat=None, normalized=False, judge=None):
    all_scores = {str(d): score_directory(d, compat, judge) for d in dirs}
    if normalized and len(dirs) < 2:
        print("note: a normalised score needs at least two directories to compare", file=sys.stderr)
    elif len(dirs) > 1:
        values, used = normalized_scores(all_scores)
        pool = [Path(d).name for d in dirs]
        for d, value in values.items():
            all_scores[d]["summary"]["normalized_score"] = {"value": value, "files_used": used, "pool": pool,
                                                            "note": NORMALIZED_NOTE}
    for d, scores in all_scores.items():
        write_atomic(Path(d, "scores.json"), json.dumps(scores, indent=1, ensure_ascii=False) + "\n")
        write_atomic(Path(d, "scores.md"), scores_markdown(Path(d).name, scores))
        s, shown = scores["summary"], ("wer", "per", "accuracy", "abstention_pct", "judge_mean")
        line = " ".join(f"{k}={fmt(s[k])}" for k in shown if k in s)
        if "normalized_score" in s:
            line += f" normalized={fmt(s['normalized_score']['value'])}"
        shown_columns = [c for c in METRICS if any(c in row for row in scores["tasks"].values())]
        print(md_table(scores["tasks"], ["files", "n"] + shown_columns, "task"))
        print(f"{d}: {s['n_files']} files, {s['n_items']} items, {line}\n  -> {Path(d, 'scores.md')} "
              f"(every file, task, category, modality) and scores.json")
        for _, key, what in RECORD_LISTS:
            records = [r for entry in scores["files"].values() for r in entry.get(key, [])]
            if records:  # named on the terminal too, as in scores.md
                print(f"  {n_records(len(records))} {what}:")
                print("    " + listing(records, "\n    ", f"... and {{}} more (scores.md names {LISTED} per file, "
                                                           "scores.json all)"))
    return all_scores


# ----- pictures: a radar of every model over the tasks, a bar panel per metric family (--plot only) -----------------

# Each radar axis shows the task's primary metric on a 0..1 scale where outward is better; the legend says how.
TO_UNIT = {"accuracy": ("acc", "accuracy", lambda x: x), "wer": ("WER", "1 − WER", lambda x: 1 - min(x, 1.0)),
           "per": ("PER", "1 − PER", lambda x: 1 - min(x, 1.0)),
           "judge_mean": ("judge", "(judge − 1) / 4", lambda x: (x - 1) / 4),
           "mae": ("MAE", "1 − MAE / 50 (age, years) or / 24 (pitch, semitones)", None)}  # short name, scale, value
MAE_SCALE = {"age": 50.0, "pitch": 24.0}
FAMILIES = [("error rate ↓", ("wer", "cer", "per")), ("closed-set accuracy ↑", ("accuracy",)),
            ("abstention % ↓", ("abstention_pct",)), ("judge score (1–5) ↑", ("judge_mean",)),
            ("MAE ↓ (age: years, pitch: semitones)", ("mae",))]


def unit_value(entries):
    values = []
    for e in entries:
        key, x = e["primary"], e.get(e["primary"])
        if x is not None:
            values.append(max(0.0, 1 - x / MAE_SCALE[e["kind"]]) if key == "mae" else TO_UNIT[key][2](x))
    return statistics.fmean(values) if values else None


def plot_scores(all_scores, path):
    """One figure: the radar (one polygon per results directory) on the left, the metric families on the right."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    names = [Path(d).name for d in all_scores]
    per_model = []  # per directory: (category, task) -> its files' entries; open-ended QA: one axis per modality
    for scores in all_scores.values():
        per_model.append({})
        for e in scores["files"].values():
            name = f"{e['task']} {e['modality']}" if e["task"] == "open-ended QA" else e["task"]
            per_model[-1].setdefault((e["category"], name), []).append(e)
    keys = sorted(set().union(*per_model))  # (category, task)
    fig = plt.figure(figsize=(22, 13), constrained_layout=True)
    grid = fig.add_gridspec(len(FAMILIES), 2, width_ratios=[1.05, 1])
    radar = fig.add_subplot(grid[:, 0], projection="polar")
    angles = np.linspace(0, 2 * np.pi, len(keys), endpoint=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, axes) in enumerate(zip(names, per_model)):
        closed = np.array([unit_value(axes.get(k, [])) for k in keys + keys[:1]], float)  # None: nan, a gap, not 0
        radar.plot(np.append(angles, angles[0]), closed, color=colors[i % 10], linewidth=2, label=name)
        radar.fill(np.append(angles, angles[0]), np.nan_to_num(closed), color=colors[i % 10], alpha=0.12)
    metric_of = {k: per_model[0].get(k, [{}])[0].get("primary", "") for k in keys}
    radar.set_xticks(angles, [f"{k[1]}\n({TO_UNIT.get(metric_of[k], ('?',))[0]})" for k in keys], fontsize=9)
    categories = sorted({k[0] for k in keys})
    for label, key in zip(radar.get_xticklabels(), keys):  # tick colour = category
        label.set_color(plt.cm.Dark2(categories.index(key[0])))
    radar.set_ylim(0, 1)
    radar.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=8, color="grey")
    radar.set_title("LLaSO-Eval by task (outward = better)", fontsize=14, pad=30)
    how = "\n".join(f"{short}: {label}" for short, label, _ in TO_UNIT.values())
    radar.add_artist(radar.legend(loc="upper left", bbox_to_anchor=(-0.12, 1.12), fontsize=11, title="model"))
    radar.legend(handles=[Patch(color=plt.cm.Dark2(i), label=c) for i, c in enumerate(categories)],
                 loc="upper right", bbox_to_anchor=(1.12, 1.12), fontsize=10, title="task category (label colour)")
    radar.text(-0.12, -0.08, "axis scales (0..1, outward = better):\n" + how, transform=radar.transAxes,
               fontsize=9, va="top")

    for row, (title, metrics) in enumerate(FAMILIES):
        panel = fig.add_subplot(grid[row, 1])
        bars = []  # (label, [value per model])
        for metric in metrics:
            tasks = {task for s in all_scores.values() for task, entry in s["tasks"].items()
                     if entry.get(metric) is not None}
            for task in sorted(tasks):  # every task that reports `metric` in any directory
                label = task if len(metrics) == 1 else f"{task} ({metric.upper()})"
                bars.append((label, [s["tasks"].get(task, {}).get(metric) for s in all_scores.values()]))
        width = 0.8 / max(1, len(names))
        x = np.arange(len(bars))
        for i, name in enumerate(names):
            heights = [np.nan if v[i] is None else v[i] for _, v in bars]
            panel.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, color=colors[i % 10], label=name)
        panel.set_xticks(x, [label for label, _ in bars], rotation=20, ha="right", fontsize=8)
        panel.set_title(title, fontsize=11, loc="left")
        panel.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    return fig


# ----- generation: every record of every test file -> <stem>_test.json with "answer" (imports torch) ----------------

PARTIAL = ".partial"  # RESULTS_DIR/.partial/<stem>.rank<r>.jsonl: {"i": record number, "answer": ...} per line


def find_test_files(paths):
    """*_test.json under each folder (recursively) plus files named directly; stems must be unique."""
    from data import corpus_files
    files = corpus_files(paths, "*_test.json")
    stems = [f.stem for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"test file names must be unique (one output file each), repeated: {duplicates}")
    return files


def distributed():
    """(rank, world size, device) from torchrun's environment, set up as training does (align.set_up); a plain
    `python evaluate.py` is rank 0 of 1."""
    from align import set_up
    env = set_up("fp32")  # the precision only names training's policy; evaluation's dtype is load_model's
    return env.rank, env.world, env.device


def default_dtype(device):
    import torch
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # bf16: as the reference evaluates


def load_model(ckpt, encoder=None, device="cpu", dtype=None):
    """The model in training's numerics (README, Precision): encoder and LLM loaded in `dtype` by from_pretrained,
    which keeps RoPE's inv_freq in fp32, and the fp32 projector cast to `dtype`, as training's autocast computes it."""
    from model import LLaSO, is_llava_checkpoint
    ckpt = Path(ckpt)
    if not (ckpt / "llaso_config.json").is_file() and not is_llava_checkpoint(ckpt):
        raise SystemExit(f"--ckpt {ckpt}: neither a llaso-mini artifact (llaso_config.json) nor the released "
                         "LLaSO-Base checkpoint (config.json with model_type llava_llama)")
    dtype = dtype or default_dtype(device)
    model = LLaSO.load(ckpt, encoder=encoder, encoder_dtype=dtype, llm_dtype=dtype).to(device)
    model.projector.to(dtype)  # it holds no buffers
    return model.eval()


def read_partials(out, stem):
    """record number -> row, from the partial files of every rank (of this or an earlier, interrupted run)."""
    done = {}
    for path in sorted((out / PARTIAL).glob(f"{stem}.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that record is generated again
            done.setdefault(row["i"], row)
    return done


def append_rows(path, rows):
    with path.open("a+b") as f:  # positioned at the end
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            f.write(b"\n")  # close a line cut short by a crash, so the new rows parse
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


def write_json(path, value):
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def merge(out, path, corpus, k):
    """Write <stem>.json from the partial files once every record of test file k has a row; True if written."""
    from data import RecordError
    start, stop = int(corpus.starts[k]), int(corpus.starts[k + 1])
    done = read_partials(out, path.stem)
    if len(done) < stop - start:
        return False
    records = []
    for i in range(start, stop):
        try:
            record = corpus.read(i)
        except RecordError:
            record = None  # its row already carries the error
        entry = dict(record) if isinstance(record, dict) else {} if record is None else {"record": record}
        entry.update((key, value) for key, value in done[i - start].items() if key != "i")  # answer (and error)
        records.append(entry)
    write_json(out / path.name, records)
    for partial in (out / PARTIAL).glob(f"{path.stem}.rank*.jsonl"):
        partial.unlink()
    return True


FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS = 1 << 20, 16


def file_fingerprint(path):
    """"size:hash": SHA-256 of 16 evenly spaced 1 MiB blocks, first and last included (the whole file up to 16 MiB):
    retraining rewrites every tensor, so they change; no mtime, so a copy of a checkpoint is the same model."""
    size, digest = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as f:
        if size <= FINGERPRINT_BLOCK * FINGERPRINT_BLOCKS:
            digest.update(f.read())
        else:
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(k * (size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return f"{size}:{digest.hexdigest()[:32]}"


def model_files(ckpt, encoder, out):
    """"part/path" -> fingerprint of every file the model is loaded from: the checkpoint folder, and encoder and LLM
    folders outside it that --encoder or llaso_config.json names (a hub id is only a name)."""
    ckpt, config = Path(ckpt), Path(ckpt) / "llaso_config.json"
    folders = {"ckpt": ckpt, **({"encoder": Path(encoder)} if encoder else {})}
    for part, name in (json.loads(config.read_text()) if config.is_file() else {}).items():
        if part in ("encoder", "llm") and part not in folders:
            folders[part] = ckpt / name if (ckpt / name).is_dir() else Path(name)  # as LLaSO.load reads it
    files = {}
    for part, folder in folders.items():
        if not folder.is_dir() or part != "ckpt" and folder.resolve().is_relative_to(ckpt.resolve()):
            continue  # a hub id, or a folder inside the checkpoint
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            skip = any(p.startswith(".") for p in relative.parts) or path.resolve().is_relative_to(Path(out).resolve())
            if path.is_file() and not skip:  # skipped: hub-cache metadata, an --out inside the checkpoint
                files[f"{part}/{relative.as_posix()}"] = file_fingerprint(path)
    return files


def check_run(out, settings, write=True):
    """Refuse to mix answers of different models or settings in one results directory: .partial/run.json holds the
    first run's fingerprint (model files, data settings, test files: may be added, not changed); a rerun must match."""
    path = out / PARTIAL / "run.json"
    if path.exists():
        previous, changed = json.loads(path.read_text()), []
        for key in sorted(set(previous) | set(settings)):
            old, new = previous.get(key), settings.get(key)
            if isinstance(old, dict) and isinstance(new, dict):  # model files, test files: the names that differ
                names = sorted(n for n in (set(old) & set(new) if key == "test_files" else set(old) | set(new))
                               if old.get(n) != new.get(n))
                if names:
                    changed.append(f"{key}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
            elif old != new:
                changed.append(f"{key}: {old} -> {new}")
        if changed:
            raise SystemExit(f"{out} holds predictions of another run; changed since: {'; '.join(changed)}. "
                             "Choose another --out, or delete it to start over.")
        settings = {**settings, "test_files": {**previous["test_files"], **settings["test_files"]}}
    if write:
        write_json(path, settings)


def generate_files(ckpt, data, audio_root, out, encoder=None, batch_size=16, max_new_tokens=256, workers=2,
                   stop_after=None, compat_chunks=False, dtype=None):
    """Greedy answers to every record of every test file -> out/<stem>.json; returns (files completed, files in total,
    error entries). stop_after (tests) ends the run after that many batches, as a crash would."""
    import torch
    from tqdm import tqdm

    from data import Corpus, LLaSODataset, make_loader
    rank, world, device = distributed()
    files, out, dtype = find_test_files(data), Path(out), dtype or default_dtype(device)
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    check_run(out, {"model_files": model_files(ckpt, encoder, out), "encoder": encoder, "dtype": str(dtype),
                    "max_new_tokens": max_new_tokens, "compat_chunks": compat_chunks,
                    "audio_root": str(Path(audio_root).resolve()),
                    "test_files": {f.stem: file_fingerprint(f) for f in files}}, write=rank == 0)
    model = load_model(ckpt, encoder, device, dtype)
    corpus = Corpus(files, cache_dir=out / PARTIAL / "index")  # byte-offset index, so records are read one by one
    dataset = LLaSODataset(corpus, model.tokenizer, model.features, audio_root, max_len=model.config.max_text_len,
                           eval_mode=True, compat_chunks=compat_chunks)
    lengths = corpus.lengths()

    batches, todo = [], {}  # todo: test file k -> records this rank still has to answer
    for k, path in enumerate(files):
        if (out / path.name).exists():
            continue  # finished in an earlier run
        done = read_partials(out, path.stem)
        start, stop = int(corpus.starts[k]), int(corpus.starts[k + 1])
        mine = [i for i in range(start + rank, stop, world) if i - start not in done]
        mine.sort(key=lambda i: -lengths[i])  # similar prompts pad less; stable: equal lengths keep input order
        batches += [mine[b: b + batch_size] for b in range(0, len(mine), batch_size)]
        todo[k] = len(mine)
    batches = batches[:stop_after]  # None: all
    print(f"rank {rank}/{world}: {len(files)} test files, {len(files) - len(todo)} already done, "
          f"{sum(todo.values())} records to answer in {len(batches)} batches of <= {batch_size}", file=sys.stderr)

    errors, cut = [], []
    loader = make_loader(dataset, batches, workers) if batches else []
    for batch in tqdm(loader, total=len(batches), disable=rank != 0, desc="generate", unit="batch"):
        with torch.inference_mode():
            answers = model.generate(batch, max_new_tokens) if batch["input_ids"] else []
        rows = [{"i": no, "answer": a} for (_, no), a in zip(batch["where"], answers)]
        for file, no, reason in batch["skipped"]:  # evaluation never drops a record: it gets an error entry
            rows.append({"i": no, "answer": "", "error": f"{Path(file).name} record {no}: {reason}"})
            errors.append(rows[-1]["error"])
        cut += [f"{Path(file).name} record {no}: {what}" for file, no, what in batch["cut"]]
        k = corpus.files.index(Path(batch["where"][0][0] if batch["where"] else batch["skipped"][0][0]))
        append_rows(out / PARTIAL / f"{files[k].stem}.rank{rank}.jsonl", rows)
        todo[k] -= len(rows)
        if world == 1 and todo[k] == 0:
            merge(out, files[k], corpus, k)  # one process: each file appears as soon as it is complete

    if world > 1:  # every rank's share is written before rank 0 merges
        torch.distributed.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    complete = sum((out / f.name).exists() for f in files)
    if rank == 0:
        complete = sum((out / f.name).exists() or merge(out, f, corpus, k) for k, f in enumerate(files))
        for line in cut[:20]:
            print(f"warning: audio cut: {line}", file=sys.stderr)
        if errors:
            print(f"{len(errors)} records could not be evaluated; they have error entries (answer \"\"):\n  "
                  + listing(errors, "\n  ", '... and {} more (search the outputs for "error")', 20), file=sys.stderr)
        print(f"{out}: {complete} of {len(files)} test files complete", file=sys.stderr)
    if world > 1:
        torch.distributed.destroy_process_group()
    return complete, len(files), errors


# ----- single-record inference --------------------------------------------------------------------------------------

def human_turn(prompt, n_audio):
    """The human turn of a one-off question. A prompt without <audio> gets it appended: instruction first, (t,a)."""
    if prompt is None:
        return AUDIO * n_audio
    if AUDIO not in prompt and n_audio:
        return prompt + AUDIO * n_audio
    if prompt.count(AUDIO) != n_audio:
        raise SystemExit(f"the prompt has {prompt.count(AUDIO)} {AUDIO} placeholders but {n_audio} --audio files")
    return prompt


def answer_one(model, prompt=None, audio=(), max_new_tokens=256):
    """The model's answer to one prompt and its audio files (none: a text-only prompt)."""
    import torch

    import model as M
    from data import RecordError, audio_features
    ids, labels = M.tokenize(model.tokenizer, human_turn(prompt, len(audio)), None, model.config.max_text_len)
    try:
        mels, counts, frames, cut = audio_features([str(p) for p in audio], model.features)
    except RecordError as error:
        raise SystemExit(str(error)) from None
    for line in cut:
        print(f"warning: {line}", file=sys.stderr)
    batch = {"input_ids": [torch.tensor(ids)], "labels": [torch.tensor(labels)], "mels": torch.from_numpy(mels),
             "audio_chunks": torch.tensor(counts, dtype=torch.long),
             "audio_frames": torch.tensor(frames, dtype=torch.long)}
    with torch.inference_mode():
        return model.generate(batch, max_new_tokens)[0]


# ----- command line -------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen = parser.add_argument_group("generation (then scoring of --out)")
    gen.add_argument("--ckpt", help="stage-1/stage-2 artifact directory or the released LLaSO-Base checkpoint")
    gen.add_argument("--data", nargs="+", metavar="EVAL_DIR_OR_FILE", help="test files, or folders with *_test.json")
    gen.add_argument("--audio-root", help="folder the records' 'voice' paths are relative to")
    gen.add_argument("--out", help="results directory: one <stem>_test.json per test file, scores.json, scores.md")
    gen.add_argument("--encoder", help="Whisper id or folder, not the checkpoint's (released: openai/whisper-large-v3)")
    gen.add_argument("--batch-size", type=int, default=16, help="records per generate call (1 = as the reference)")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="greedy decoding budget (reference: 256)")
    gen.add_argument("--compat-chunks", action="store_true", help="the reference's 480,001-sample chunks, not 30 s")
    gen.add_argument("--workers", type=int, default=2, help="DataLoader workers reading audio and making log-mels")
    gen.add_argument("--precision", choices=["bf16", "fp32"], help="default bf16 on CUDA (reference), fp32 on CPU")
    gen.add_argument("--preset", choices=["tiny"], help="tiny: sample eval set, out/instruct -> out/eval")
    one = parser.add_argument_group("single-record inference (prints the answer)")
    one.add_argument("--audio", nargs="+", metavar="WAV", help="audio file(s), one per <audio> in --prompt")
    one.add_argument("--prompt", help="human turn (default: <audio>); one without <audio> gets it appended")
    score = parser.add_argument_group("scoring")
    score.add_argument("--score", nargs="+", metavar="RESULTS_DIR", help="score the prediction files in each dir")
    score.add_argument("--compat", choices=["llaso", "standard"], help="llaso: the reference scripts' numbers; "
                       "standard: default but WER/CER/PER unnormalised (reference letter-PER, gold as reference)")
    score.add_argument("--normalized", action="store_true", help="normalised score across the dirs (default if >1)")
    score.add_argument("--judge-url", help="OpenAI-compatible chat completions URL; judges records without verdict "
                       "(API key: $OPENAI_API_KEY, sent to this URL's host only)")
    score.add_argument("--judge-key", help=argparse.SUPPRESS)  # refused below: kept to explain why
    score.add_argument("--judge-model", default="gpt-4o-mini", help="judge model (pin a dated version for reports)")
    score.add_argument("--plot", metavar="FILE.png", help="after scoring: radar and bars of the dirs (matplotlib)")
    args = parser.parse_args(argv)
    if args.judge_key is not None:
        parser.error("--judge-key: a key on the command line is visible to every user of this machine (ps, shell "
                     "history); set the OPENAI_API_KEY environment variable instead")
    judge = None
    if args.judge_url:
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            parser.error("--judge-url needs the API key in the OPENAI_API_KEY environment variable")
        judge = {"url": args.judge_url, "key": key, "model": args.judge_model,
                 "temperature": 0.1 if args.compat == "llaso" else 0.0}  # 0.1 = reference setting

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked first: a missing package must not waste a run)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -r requirements-extras.txt (or pip install matplotlib)")
    if args.score:
        for d in args.score:
            if not Path(d).is_dir():
                parser.error(f"--score: {d} is not a directory")
        score_and_exit(args.score, args.compat, args.normalized, judge, args.plot)
        return

    if args.preset == "tiny":
        args.ckpt = args.ckpt or "out/instruct"
        args.data = args.data or [str(SAMPLE / "LLaSO-Eval")]
        args.audio_root = args.audio_root or str(SAMPLE / "audio")
        args.out = args.out or "out/eval"
        if not (Path(args.ckpt) / "llaso_config.json").is_file():
            sys.exit(f"no finished tiny stage-2 checkpoint in {args.ckpt}: train one first with\n"
                     "    python align.py --preset tiny && python instruct.py --preset tiny\nor pass --ckpt DIR")
    if not args.ckpt:
        parser.error("nothing to do: pass --ckpt DIR (generation or --audio/--prompt), --preset tiny, or --score DIR")

    import torch
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.precision]
    if args.audio or args.prompt is not None:
        _, _, device = distributed()
        print(answer_one(load_model(args.ckpt, args.encoder, device, dtype), args.prompt, args.audio or [],
                         args.max_new_tokens))
        return

    missing = [f"--{name.replace('_', '-')}" for name in ("data", "audio_root", "out") if not getattr(args, name)]
    if missing:
        parser.error(f"generation needs {', '.join(missing)} (or --preset tiny)")
    try:
        complete, total, _ = generate_files(args.ckpt, args.data, args.audio_root, args.out, args.encoder,
                                            args.batch_size, args.max_new_tokens, args.workers,
                                            compat_chunks=args.compat_chunks, dtype=dtype)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 scores
        if complete < total:
            sys.exit(f"{total - complete} test files are incomplete: run the same command again to finish them")
        score_and_exit([args.out], args.compat, judge=judge, plot=args.plot)


def score_and_exit(dirs, compat, normalized=False, judge=None, plot=None):
    """Score from the command line: a folder with nothing to score or a file that cannot be scored fails the run."""
    try:
        all_scores = score_directories(dirs, compat, normalized, judge)
    except (NothingToScore, JudgeError) as error:
        sys.exit(f"error: {error}")
    if plot:
        plot_scores(all_scores, plot)
        print(f"plot: {plot}")
    if any(scores["skipped"] for scores in all_scores.values()):
        sys.exit("some files could not be scored: see the errors above and the notes in scores.md")


if __name__ == "__main__":
    main()
