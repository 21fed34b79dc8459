"""Scoring half of evaluate.py: golden values of real published predictions, hand-computed default-mode goldens,
the judge request format against a local fake server, unknown files and the cross-model normalised score."""
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import evaluate as ev  # noqa: E402

from conftest import PREDICTIONS  # noqa: E402


def write_results(directory, stem, pairs, key="answer", human="Answer.<audio>"):
    directory.mkdir(parents=True, exist_ok=True)
    records = [{"voice": ["x.wav"], "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": g}],
                key: p} for g, p in pairs]
    (directory / f"{stem}.json").write_text(json.dumps(records), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# golden: the reference scripts' numbers on Qwen2-Audio's released LLaSO-Eval predictions


@pytest.fixture(scope="module")
def qwen_scores(tmp_path_factory):
    """Score a writable copy through the command line, as a user would."""
    copy = tmp_path_factory.mktemp("qwen") / "Qwen2-Audio"
    shutil.copytree(PREDICTIONS / "Qwen2-Audio", copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # a checkout may be read-only
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--score", str(copy), "--compat", "llaso"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    assert (copy / "scores.md").read_text().startswith("# Scores: Qwen2-Audio")
    return json.loads((copy / "scores.json").read_text())


def test_compat_reproduces_reference_scores_for_all_44_files(qwen_scores):
    expected = json.loads((PREDICTIONS / "Qwen2-Audio.expected.json").read_text())
    assert len(expected["files"]) == 44 and set(qwen_scores["files"]) == set(expected["files"])
    for stem, exp in expected["files"].items():
        got = qwen_scores["files"][stem]
        assert got["n"] == exp["n"], stem
        assert got["category"] == exp["category"], stem
        for key, value in exp["reference_compatible"].items():
            if key == "regex_agreement":
                for aspect, v in value.items():
                    assert got["pron_agreement"][aspect] == pytest.approx(v, abs=1e-6), (stem, aspect)
            else:
                tolerance = 0.01 if key == "mae" else 1e-6
                assert got[key] == pytest.approx(value, abs=tolerance), (stem, key)


def test_compat_summary_matches_reference(qwen_scores):
    expected = json.loads((PREDICTIONS / "Qwen2-Audio.expected.json").read_text())["summary"]
    summary = qwen_scores["summary"]
    assert summary["accuracy"] == pytest.approx(expected["closed_set_accuracy_mean"], abs=1e-6)
    assert summary["abstention_pct"] == pytest.approx(expected["abstention_mean_over_files_pct"], abs=1e-6)
    assert summary["open_ended_judge_mean"] == pytest.approx(expected["open_ended_judge_mean"], abs=1e-6)
    assert summary["n_items"] == 10605


def test_standard_orientation_matches_published_unnormalised_rates():
    expected = json.loads((PREDICTIONS / "Qwen2-Audio.expected.json").read_text())["files"]
    for stem, metric in (("ASR_test", ev.wer_cer), ("phoneme_recognition_test", ev.phone_error_rate)):
        rows = ev.load_results(PREDICTIONS / "Qwen2-Audio" / f"{stem}.json").rows
        got = metric([r.gold for r in rows], [r.prediction for r in rows], "standard")
        for key, value in expected[stem]["standard_no_normalization"].items():
            assert got[key] == pytest.approx(value, abs=1e-6), (stem, key)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def as_jsonl(source, target):
    """A copy of a results folder with every prediction file as <stem>.jsonl, one record per line."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.json"))
    for path in source.glob("*.json"):
        write_jsonl(target / f"{path.stem}.jsonl", json.loads(path.read_text(encoding="utf-8")))


PERFECT = {"asr": {"wer": 0, "cer": 0}, "per": {"per": 0}, "acc": {"accuracy": 1, "abstention_pct": 0},
           "judge+acc": {"accuracy": 1}, "age": {"mae": 0, "coverage": 1}, "pitch": {"mae": 0, "coverage": 1}}


def test_gold_answers_score_perfectly_on_all_44_files_as_json_and_as_jsonl(tmp_path):
    """Property: a model that answers every gold verbatim is perfect on every metric of the default mode."""
    source, perfect = PREDICTIONS / "Qwen2-Audio", tmp_path / "perfect"
    perfect.mkdir()
    for path in source.glob("*.json"):
        records = json.loads(path.read_text(encoding="utf-8"))
        for record in records:
            record["answer"] = record["conversations"][1]["value"]
        (perfect / path.name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    as_jsonl(perfect, tmp_path / "perfect-jsonl")
    scores = ev.score_directory(perfect)
    assert len(scores["files"]) == 44 and not scores["skipped"]
    checked = set()
    for stem, entry in scores["files"].items():
        for key, value in PERFECT.get(entry["kind"], {}).items():
            assert entry[key] == value, (stem, key, entry[key])
            checked.add(entry["kind"])
        if entry["kind"] == "pron" and entry["pron_agreement"]["matched_entries"]:
            assert entry["pron_agreement"]["accuracy"] == entry["pron_agreement"]["fluency_accuracy"] == 1.0
    assert checked == set(PERFECT)
    assert ev.score_directory(tmp_path / "perfect-jsonl") == scores


@pytest.mark.parametrize("compat", [None, "llaso"])
def test_jsonl_scores_exactly_like_the_json_list(tmp_path, compat):
    """The published files (with their judge verdicts) as JSONL: every number identical, in both modes."""
    as_jsonl(PREDICTIONS / "Qwen2-Audio", tmp_path / "jsonl")
    want = ev.score_directory(PREDICTIONS / "Qwen2-Audio", compat)
    assert ev.score_directory(tmp_path / "jsonl", compat) == want and want["summary"]["n_files"] == 44


def test_generation_output_named_jsonl_is_read(tmp_path):
    """Generation names its output after the test file: a .jsonl test file gives a .jsonl name, written as a list."""
    source = PREDICTIONS / "Qwen2-Audio" / "vctk_gender_classification_test.json"
    records = json.loads(source.read_text(encoding="utf-8"))
    (tmp_path / "vctk_gender_classification_test.jsonl").write_text(json.dumps(records, indent=2), encoding="utf-8")
    got = ev.score_directory(tmp_path)["files"]["vctk_gender_classification_test"]
    assert got == ev.score_directory(source.parent)["files"]["vctk_gender_classification_test"]


def test_scoring_does_not_import_torch():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import evaluate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------------
# default-mode goldens computed by hand


def test_wer_roles_default_vs_compat():
    golds, preds = ["the cat sat"], ["the cat sat on the mat"]
    # gold as reference: 3 insertions / 3 gold words = 1.0; chars: " on the mat" = 11 insertions / 11 gold chars
    assert ev.wer_cer(golds, preds, None)["wer"] == 1.0
    assert ev.wer_cer(golds, preds, None)["cer"] == 1.0
    # reference quirk: the answer is the reference -> 3 deletions / 6 answer words; 11 / 22 chars
    assert ev.wer_cer(golds, preds, "llaso")["wer"] == 0.5
    assert ev.wer_cer(golds, preds, "llaso")["cer"] == 0.5


def test_wer_normalization():
    golds, preds = ["Hello,  world! It’s me."], ["hello world it's me"]
    # default: both sides become "hello world it's me" -> 0 errors
    assert ev.wer_cer(golds, preds, None)["wer"] == 0.0
    # raw: "Hello," "world!" "It’s" "me." vs "hello" "world" "it's" "me" -> 4 substitutions / 4 words
    assert ev.wer_cer(golds, preds, "standard")["wer"] == 1.0
    assert ev.normalize_text("Don't STOP -- now!") == "don't stop now"


def test_wer_empty_prediction_is_all_deletions():
    golds, preds = ["a b c d", "x y"], ["a b c d", ""]
    # 2 deletions / (4 + 2) gold words
    out = ev.wer_cer(golds, preds, None)
    assert out["wer"] == pytest.approx(2 / 6) and out["empty_predictions"] == 1
    # compat: the empty answer is the reference side -> 2 insertions / 4 answer words, and the reference would crash
    out = ev.wer_cer(golds, preds, "llaso")
    assert out["wer"] == pytest.approx(2 / 4) and "raise" in out["note"]


def test_wer_empty_reference():
    # an empty gold adds its 2 insertions to the numerator and nothing to the denominator: 2 / 2
    out = ev.wer_cer(["a b", ""], ["a b", "uh huh"], None)
    assert out["wer"] == 1.0 and out["empty_golds"] == 1
    # no reference word in the whole corpus: undefined, not jiwer's raw insertion count
    assert ev.wer_cer([""], ["uh huh"], None)["wer"] is None
    assert ev.wer_cer([""], [""], None)["wer"] is None


def test_phone_error_rate():
    golds, preds = ["ˈkæt", "biː"], ["kat", "bi"]
    # default phones: k æ t vs k a t -> 1 sub; b iː vs b i -> 1 sub; corpus (1 + 1) / (3 + 2)
    assert ev.ipa_phones("ˈt͡ʃiː") == ["t͡ʃ", "iː"]
    assert ev.phone_error_rate(golds, preds, None)["per"] == pytest.approx(2 / 5)
    # reference letters: K T vs K A T -> 1 edit / 3 answer letters; B I vs B I -> 0; mean (1/3 + 0) / 2
    assert ev.phone_error_rate(golds, preds, "llaso")["per"] == pytest.approx(1 / 6)
    # standard orientation divides by the 2 gold letters: (1/2 + 0) / 2
    assert ev.phone_error_rate(golds, preds, "standard")["per"] == pytest.approx(1 / 4)
    # TIMIT table merges D with A and H with W: "dh" and "aw" are the same sequence
    assert ev.phone_error_rate(["dh"], ["aw"], "llaso")["per"] == 0.0
    # empty answer side: 1 unless both are empty
    assert ev.phone_error_rate(["ab", "ɪ"], ["", ""], "llaso")["per"] == pytest.approx(0.5)


def test_accuracy_male_is_not_female():
    golds = ["Female.", "Male.", "Male."]
    preds = ["It is a female voice.", "male", "female"]
    # default: {female} correct, {male} correct, {female} != {male} -> 2/3
    assert ev.accuracy(golds, preds, None)["accuracy"] == pytest.approx(2 / 3)
    # reference: "male" is a substring of "female", so the first answer names two labels -> only item 2, 1/3
    assert ev.accuracy(golds, preds, "llaso")["accuracy"] == pytest.approx(1 / 3)


def test_accuracy_and_abstention_with_multi_label_answers():
    golds, preds = ["Happy.", "Sad.", "Angry."], ["happy or sad", "Sad.", "I think it is angry."]
    # item 1 names two labels (wrong, abstains), items 2 and 3 name the gold only -> 2/3 correct, 1/3 abstain
    assert ev.accuracy(golds, preds, None)["accuracy"] == pytest.approx(2 / 3)
    assert ev.abstention(golds, preds, None)["abstention_pct"] == pytest.approx(100 / 3)
    assert ev.abstention(golds, preds, "llaso")["abstention_pct"] == 33.3333  # reference rounds to 4 decimals


@pytest.mark.parametrize("labels, answer", [
    (["Irish.", "Northern Irish.", "Scottish."], "The speaker has a Northern Irish accent."),
    (["Hue lightup", "Iot hue lightup", "Iot hue lightoff"], "The intent is iot hue lightup."),
])
def test_a_label_inside_a_longer_named_label_is_not_a_second_label(labels, answer):
    golds, preds = labels + [labels[1]], labels + [answer]  # every label answered verbatim, then one in a sentence
    # default: "irish" inside "northern irish" is part of that label, not a second one: all correct, none abstains
    assert ev.accuracy(golds, preds, None)["accuracy"] == 1.0
    assert ev.abstention(golds, preds, None)["abstention_pct"] == 0.0
    # reference: the shorter label is a substring too, so the sentence is wrong, and both it and the verbatim
    # longer label count as naming two labels
    assert ev.accuracy(golds, preds, "llaso")["accuracy"] == 3 / 4
    assert ev.abstention(golds, preds, "llaso")["abstention_pct"] == 50.0


def test_the_shorter_label_is_not_named_by_the_longer_one():
    labels = ["Irish.", "Northern Irish.", "Scottish."]
    # gold "Irish": "Northern Irish" names the other label only (wrong, not an abstention); "Irish, not Northern
    # Irish" names "irish" on its own as well, so two labels (wrong, abstains)
    golds, preds = labels + ["Irish.", "Irish."], labels + ["Northern Irish.", "Irish, not Northern Irish."]
    assert ev.labels_named("irish, not northern irish", {"irish", "northern irish"}) == {"irish", "northern irish"}
    assert ev.accuracy(golds, preds, None)["accuracy"] == pytest.approx(3 / 5)
    assert ev.abstention(golds, preds, None)["abstention_pct"] == pytest.approx(100 / 5)


def test_mae_age_ranges_words_garbage():
    golds = ["20", "30", "40", "50", "60"]
    preds = ["20-30", "about 35 years", "adult", "teens", ""]
    # 20-30 -> 25 (|20-25| = 5), 35 (|30-35| = 5), adult -> 22 (|40-22| = 18), two unparseable: 28 / 3
    out = ev.mae(golds, preds, None, "age")
    assert out["mae"] == pytest.approx(28 / 3)
    assert (out["n_used"], out["coverage"], out["unparseable_predictions"]) == (3, 0.6, 2)
    assert ev.mae(golds, preds, "llaso", "age")["mae"] == 9.33  # reference rounds age MAE to 2 decimals
    assert ev.parse_age("21-22") == 22  # mean 21.5, Python rounds half to even


def test_mae_pitch_parsing_and_range():
    golds, preds = ["60", "61", "62", "200"], ["60.6", "pitch 64", "garbage", "100"]
    # 60.6 -> 61 (|60-61| = 1), 64 (|61-64| = 3), garbage unparseable, gold 200 outside 0..127 dropped: 4 / 2
    out = ev.mae(golds, preds, None, "pitch")
    assert out["mae"] == 2.0 and (out["n_used"], out["out_of_range"], out["n_dropped"]) == (2, 1, 2)


@pytest.mark.parametrize("text, midi", [
    ("60", 60), ("60.6", 61), ("60.5", 60), ("61.5", 62),  # a plain float: nearest integer, halves to even
    ("The pitch is 40.21.", 40), ("MIDI 64.7, not 63", 65),  # the first number in a text
    ("60-65", 62), ("60.2 - 61.4", 61), ("60-61", 60),  # a range: its midpoint (62.5, 60.8, 60.5), rounded
    ("garbage", None), ("nan", None), ("inf", None)])
def test_pitch_is_an_integer_midi_note(text, midi):
    got = ev.parse_pitch(text)
    assert got == midi and (got is None or type(got) is int)


def test_pitch_mae_is_over_integer_notes_in_both_modes():
    golds, preds = ["40", "50"], ["The pitch is 40.21.", "about 48.6-49.0"]
    # |40 - 40| + |50 - int(round(48.8))| = 0 + 1 -> 0.5 (floats would give (0.21 + 1.2) / 2)
    assert ev.mae(golds, preds, None, "pitch")["mae"] == ev.mae(golds, preds, "llaso", "pitch")["mae"] == 0.5


def test_pron_agreement():
    gold = "For the sentence: accuracy is 9, prosodic is 8, fluency is 7 total score is 8."
    preds = ["Accuracy: 9, Prosody: 7, Fluency: 7", "I give 9 for accuracy, 8 for prosody and 7 for fluency",
             "Great job"]
    # answer 2 parses only with the number-first regex, answer 3 never: 2 matched; prosodic agrees once of 2
    out = ev.pron_agreement([gold] * 3, preds)["pron_agreement"]
    assert out == {"accuracy": 1.0, "prosodic_accuracy": 0.5, "fluency_accuracy": 1.0, "matched_entries": 2,
                   "total_entries": 3}


def test_judge_verdicts_split_stale_and_unparsed(tmp_path):
    lines = [json.dumps({"index": 0, "predicted": "a", "evaluation": "Score: 5  \nExplanation: ok"}),
             # a verdict broken in two by a raw newline, with the score on its own line
             json.dumps({"index": 1, "predicted": "b", "evaluation": "Score:\n3"}).replace("\\n", "\n"),
             json.dumps({"index": 2, "predicted": "old answer", "evaluation": "Score: 1"}),
             json.dumps({"index": 3, "predicted": "d", "evaluation": "no verdict"})]
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(lines) + "\n")
    verdicts = ev.read_verdicts(path)
    assert sorted(verdicts) == [0, 1, 2, 3]
    # default: index 2 judged an older answer, index 3 has no score -> mean(5, 3), coverage 2/4
    rows = [ev.Row(i, "<audio>", "gold", answer) for i, answer in enumerate("abcd")]
    out = ev.judge_means(verdicts, rows, None)
    assert (out["judge_mean"], out["judge_coverage"], out["judge_stale"], out["judge_unparsed"]) == (4.0, 0.5, 1, 1)
    assert ev.judge_means(verdicts, rows, "llaso")["judge_mean"] == 3.0  # mean(5, 3, 1)


# ---------------------------------------------------------------------------------------------------------------------
# the judge client against a local fake endpoint


@pytest.fixture
def serve():
    """start(handler) -> port of an HTTP server on 127.0.0.1, stopped after the test."""
    running = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread))
        return server.server_port

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def judge_handler(seen, evaluation="Score: 4  \nExplanation: fine"):
    """A fake chat-completions endpoint: records (method, path, headers, body) of each request, answers `evaluation`."""

    class FakeJudge(http.server.BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, dict(self.headers), json.loads(self.rfile.read(length) or "null")))
            reply = json.dumps({"choices": [{"message": {"content": evaluation}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    return FakeJudge


def test_judge_request_format_and_cache(tmp_path, serve):
    requests = []
    results = tmp_path / "model"
    write_results(results, "dolly_input_1_test", [("Gold one.", " Answer one. "), ("Gold two.", "Answer two.")])
    (results / "gpt_result").mkdir()
    cached = {"file": "dolly_input_1_test.json", "index": 0, "predicted": "Answer one.", "reference": "Gold one.",
              "evaluation": "Score: 2  \nExplanation: cached"}
    (results / "gpt_result" / "dolly_input_1_test.jsonl").write_text(json.dumps(cached) + "\n")

    url = f"http://127.0.0.1:{serve(judge_handler(requests))}/v1/chat/completions"
    judge = {"url": url, "key": "test-key", "model": "gpt-4o-mini", "temperature": 0.0}
    scores = ev.score_directory(results, judge=judge)

    assert len(requests) == 1  # record 0 came from the cache
    method, path, headers, body = requests[0]
    assert (method, path, headers["Authorization"]) == ("POST", "/v1/chat/completions", "Bearer test-key")
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.0 and body["max_tokens"] == 4096
    system = ("You are evaluating the performance of an AI assistant in an audio question answering task.\n"
              "Given a **Reference Answer** and a **Predicted Answer**, assign a score from 1 to 5 based on "
              "Relevance & Accuracy.\nOutput format (exactly, no other text):\nScore: <integer 1-5>\n"
              "Explanation: <concise justification focusing on both relevance and accuracy>\n")  # the reference's
    assert body["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "**Reference Answer:**\nGold two.\n\n**Predicted Answer:**\nAnswer two.\n\n"
                                    "Please produce the evaluation."}]
    lines = [json.loads(l) for l in (results / "gpt_result" / "dolly_input_1_test.jsonl").read_text().splitlines()]
    assert lines[1] == {"file": "dolly_input_1_test.json", "index": 1, "predicted": "Answer two.",
                        "reference": "Gold two.", "evaluation": "Score: 4  \nExplanation: fine"}
    assert scores["files"]["dolly_input_1_test"]["judge_mean"] == 3.0  # mean(cached 2, new 4)


def test_judge_verdicts_are_keyed_by_record_index(tmp_path, serve):
    """Record 0 could not be generated and has no gold: it is not scored, and record 1 keeps index 1, not row 0."""
    requests = []
    results = tmp_path / "model"
    write_results(results, "dolly_input_1_test", [("Gold one.", "Answer one."), ("Gold two.", "Answer two.")])
    records = json.loads((results / "dolly_input_1_test.json").read_text())
    records.insert(0, {"voice": ["gone.wav"], "answer": "", "error": "dolly_input_1_test.json record 0: unreadable"})
    (results / "dolly_input_1_test.json").write_text(json.dumps(records))
    cached = {"file": "dolly_input_1_test.json", "index": 2, "predicted": "Answer two.", "reference": "Gold two.",
              "evaluation": "Score: 1"}
    (results / "gpt_result").mkdir()
    (results / "gpt_result" / "dolly_input_1_test.jsonl").write_text(json.dumps(cached) + "\n")
    url = f"http://127.0.0.1:{serve(judge_handler(requests, 'Score: 5'))}/v1/chat/completions"
    scores = ev.score_directory(results, judge={"url": url, "key": "k", "model": "m", "temperature": 0.0})
    assert [body["messages"][1]["content"].split("\n")[1] for *_, body in requests] == ["Gold one."]
    lines = [json.loads(l) for l in (results / "gpt_result" / "dolly_input_1_test.jsonl").read_text().splitlines()]
    assert [(v["index"], v["predicted"]) for v in lines] == [(2, "Answer two."), (1, "Answer one.")]
    entry = scores["files"]["dolly_input_1_test"]
    assert (entry["judge_mean"], entry["judge_coverage"], entry["judge_stale"]) == (3.0, 1.0, 0)  # mean(5, 1)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # another name, or the same address on another port
def test_judge_refuses_a_redirect_to_another_host(tmp_path, serve, host):
    elsewhere = []
    other = serve(judge_handler(elsewhere))

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{other}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    results = tmp_path / "model"
    write_results(results, "dolly_input_1_test", [("Gold.", "Answer.")])
    url = f"http://127.0.0.1:{serve(Redirect)}/v1/chat/completions"
    with pytest.raises(Exception) as caught:
        ev.score_directory(results, judge={"url": url, "key": "secret-key", "model": "m", "temperature": 0.0})
    assert elsewhere == []  # the other host never saw a request, let alone the key
    assert isinstance(caught.value, ev.JudgeError)
    assert f"{host}:{other}" in str(caught.value) and "refused" in str(caught.value)
    verdicts = results / "gpt_result" / "dolly_input_1_test.jsonl"
    assert not verdicts.exists() or not verdicts.read_text()


def test_judge_key_comes_from_the_environment_only(tmp_path, monkeypatch, capsys):
    write_results(tmp_path, "vctk_gender_classification_test", [("Male.", "Male.")])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    score = ["--score", str(tmp_path), "--judge-url", "http://127.0.0.1:9/v1/chat/completions"]
    with pytest.raises(SystemExit) as caught:
        ev.main(score + ["--judge-key", "sk-on-the-command-line"])
    error = capsys.readouterr().err
    assert caught.value.code == 2 and "OPENAI_API_KEY" in error and "ps" in error
    assert "sk-on-the-command-line" not in error
    with pytest.raises(SystemExit):
        ev.main(score)
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    ev.main(score)  # nothing to judge in a closed-set file: no request, no error
    assert not (tmp_path / "gpt_result").exists()


# ---------------------------------------------------------------------------------------------------------------------
# files outside the catalogue, other prediction keys, broken files; normalised score across models


def test_unknown_and_broken_files_do_not_crash(tmp_path):
    write_results(tmp_path, "foo_classification_test", [("Cat.", "cat"), ("Dog.", "a dog")], key="result")
    write_results(tmp_path, "ASR_extra_test", [("hello there", "hello here")], key="prediction")
    write_results(tmp_path, "mystery_test", [("a long free-form gold answer", "something")])
    (tmp_path / "broken_test.json").write_text(json.dumps([{"answer": "x"}]))
    scores = ev.score_directories([tmp_path])[str(tmp_path)]
    files = scores["files"]
    assert files["foo_classification_test"]["accuracy"] == 1.0 and files["foo_classification_test"]["kind"] == "acc"
    assert files["ASR_extra_test"]["wer"] == 0.5  # 1 substitution / 2 words
    assert files["mystery_test"]["kind"] == "judge" and files["mystery_test"]["judge_mean"] is None
    assert "broken_test" not in files and scores["skipped"] == ["broken_test.json record 0: expected 'conversations' "
                                                                "= [human turn, gpt turn]"]
    notes = "\n".join(scores["notes"])
    assert "broken_test.json record 0" in notes and "`mystery_test` is not a LLaSO-Eval file" in notes
    assert "scored as `acc`" in (tmp_path / "scores.md").read_text()


def test_empty_golds_and_answers_that_are_not_text_are_listed_never_coerced(tmp_path, capsys):
    write_results(tmp_path, "vctk_gender_classification_test", [("Male.", "Male."), ("Female.", ["Female."]),
                                                               ("Male.", {"text": "Male."}), ("", "Male."),
                                                               ("Female.", "Female."), ("Male.", None)])
    write_results(tmp_path, "NSynth_pitch_recognition_test", [(60, "60"), ("61", 61), ("62", "62")])
    scores = ev.score_directories([tmp_path])[str(tmp_path)]
    printed = capsys.readouterr().out
    gender, pitch = scores["files"]["vctk_gender_classification_test"], scores["files"]["NSynth_pitch_recognition_test"]
    # the list, the object and the null are error entries scored as empty answers (wrong, abstaining); the empty
    # gold is left out: 2 of 5 correct, 3 of 5 abstain
    assert (gender["n"], gender["accuracy"], gender["abstention_pct"]) == (5, 0.4, 60.0)
    assert ev.score_directory(tmp_path, "llaso")["files"]["vctk_gender_classification_test"]["accuracy"] == 0.4
    name = "vctk_gender_classification_test.json record"
    assert gender["error_records"] == [f"{name} 1: the answer is a JSON list, not a string",
                                       f"{name} 2: the answer is a JSON object, not a string",
                                       f"{name} 5: the answer is null, not a string"]
    assert gender["unscorable_records"] == [f"{name} 3: the gold answer is empty"]
    # a number is not coerced either: gold 60 is left out, answer 61 is an error entry (unparseable, dropped)
    assert pitch["unscorable_records"] == ["NSynth_pitch_recognition_test.json record 0: the gold answer is a JSON "
                                           "number, not a string"]
    assert (pitch["n"], pitch["errors"], pitch["mae"], pitch["coverage"]) == (2, 1, 0.0, 0.5)
    assert (scores["summary"]["errors"], scores["summary"]["unscorable"]) == (4, 2)
    markdown = (tmp_path / "scores.md").read_text()
    for listed in gender["error_records"] + gender["unscorable_records"] + pitch["unscorable_records"]:
        assert listed in markdown and listed in printed


def test_jsonl_files_layout_conflicts_and_broken_lines(tmp_path):
    record = {"conversations": [{"value": "<audio>"}, {"value": "Male."}], "answer": "male"}
    write_jsonl(tmp_path / "vctk_gender_classification_test.jsonl", [record])
    (tmp_path / "velocity_classification_test.jsonl").write_text(json.dumps(record) + "\n\n{oops\n")
    write_results(tmp_path, "meld_SV_classification_test", [("Joey.", "Joey")])
    (tmp_path / "meld_SV_classification_test.jsonl").write_text("")
    scores = ev.score_directory(tmp_path)
    assert list(scores["files"]) == ["vctk_gender_classification_test"]
    assert scores["files"]["vctk_gender_classification_test"]["accuracy"] == 1.0
    assert scores["skipped"] == [
        "meld_SV_classification_test: two prediction files, meld_SV_classification_test.json and "
        "meld_SV_classification_test.jsonl: keep one",
        "velocity_classification_test.jsonl line 3: not a JSON record (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)); expected a JSON list of records, or JSONL: one record a line"]


def test_nothing_to_score_fails_and_says_what_is_there(tmp_path):
    write_results(tmp_path / "Qwen2-Audio", "ASR_test", [("a b", "a b")])
    (tmp_path / "notes.txt").write_text("predictions are one level down")
    (tmp_path / "scores.json").write_text("{}")
    run = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--score", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0
    assert f"{tmp_path}: no prediction files" in run.stderr
    assert "notes.txt" in run.stderr and "Qwen2-Audio/ (1 prediction file)" in run.stderr


def test_normalized_score_across_models(tmp_path):
    asr = {"A": "a b c d", "B": "a b c x", "C": ""}  # WER 0, 1/4, 1 (empty = 4 deletions)
    gender = {"A": ["Male", "Male", "Male", "Male"], "B": ["Male", "Female", "Male", "Male"],
              "C": ["Female", "Female", "Female", "Male"]}  # golds M F M F -> accuracy 1/2, 3/4, 1/4
    for model in "ABC":
        write_results(tmp_path / model, "ASR_test", [("a b c d", asr[model])])
        write_results(tmp_path / model, "vctk_gender_classification_test", zip(["Male", "Female"] * 2, gender[model]))
        write_results(tmp_path / model, "velocity_classification_test", [("50", "50")])  # a tie: carries nothing
    scores = ev.score_directories([tmp_path / m for m in "ABC"])
    # WER inverted: A 1, B 1 - 0.25 = 0.75, C 0; accuracy min-max over [1/4, 3/4]: A 0.5, B 1, C 0
    expected = {"A": (1 + 0.5) / 2, "B": (0.75 + 1) / 2, "C": 0.0}
    for model, value in expected.items():
        normalized = scores[str(tmp_path / model)]["summary"]["normalized_score"]
        assert normalized["value"] == pytest.approx(value) and normalized["files_used"] == 2
        assert "not comparable" in normalized["note"]


def test_a_crash_while_writing_scores_leaves_the_old_scores_whole(tmp_path, monkeypatch):
    write_results(tmp_path, "ASR_test", [("a b c d", "a b c d")])
    ev.score_directories([tmp_path])
    before = {name: (tmp_path / name).read_text() for name in ("scores.json", "scores.md")}
    write_results(tmp_path, "ASR_test", [("a b c d", "a b x")])  # new answers, then the disk fills up mid-write
    write_text = Path.write_text

    def torn(self, text, **kwargs):
        write_text(self, text[: len(text) // 2], **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError):
        ev.score_directories([tmp_path])
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ASR_test.json", "scores.json", "scores.md"]
