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
        rows = ev.load_results(PREDICTIONS / "Qwen2-Audio" / f"{stem}.json")
        got = metric([g for _, g, _ in rows], [p for _, _, p in rows], "standard")
        for key, value in expected[stem]["standard_no_normalization"].items():
            assert got[key] == pytest.approx(value, abs=1e-6), (stem, key)


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
    out = ev.judge_means(verdicts, ["a", "b", "c", "d"], None)
    assert (out["judge_mean"], out["judge_coverage"], out["judge_stale"], out["judge_unparsed"]) == (4.0, 0.5, 1, 1)
    assert ev.judge_means(verdicts, ["a", "b", "c", "d"], "llaso")["judge_mean"] == 3.0  # mean(5, 3, 1)


# ---------------------------------------------------------------------------------------------------------------------
# the judge client against a local fake endpoint


def test_judge_request_format_and_cache(tmp_path):
    requests = []

    class FakeJudge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers["Authorization"], body))
            reply = json.dumps({"choices": [{"message": {"content": "Score: 4  \nExplanation: fine"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    results = tmp_path / "model"
    write_results(results, "dolly_input_1_test", [("Gold one.", " Answer one. "), ("Gold two.", "Answer two.")])
    (results / "gpt_result").mkdir()
    cached = {"file": "dolly_input_1_test.json", "index": 0, "predicted": "Answer one.", "reference": "Gold one.",
              "evaluation": "Score: 2  \nExplanation: cached"}
    (results / "gpt_result" / "dolly_input_1_test.jsonl").write_text(json.dumps(cached) + "\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        judge = {"url": url, "key": "test-key", "model": "gpt-4o-mini", "temperature": 0.0}
        scores = ev.score_directory(results, judge=judge)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    assert len(requests) == 1  # record 0 came from the cache
    path, auth, body = requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer test-key"
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.0 and body["max_tokens"] == 4096
    system = ("You are evaluating the performance of an AI assistant in an audio question answering task.\n"
              "Given a **Reference Answer** and a **Predicted Answer**, assign a score from 1 to 5 based on "
              "Relevance & Accuracy.\nOutput format (exactly, no other text):\nScore: <integer 1-5>\n"
              "Explanation: <concise justification focusing on both relevance and accuracy>\n")
    assert body["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "**Reference Answer:**\nGold two.\n\n**Predicted Answer:**\nAnswer two.\n\n"
                                    "Please produce the evaluation."}]
    lines = [json.loads(l) for l in (results / "gpt_result" / "dolly_input_1_test.jsonl").read_text().splitlines()]
    assert lines[1] == {"file": "dolly_input_1_test.json", "index": 1, "predicted": "Answer two.",
                        "reference": "Gold two.", "evaluation": "Score: 4  \nExplanation: fine"}
    assert scores["files"]["dolly_input_1_test"]["judge_mean"] == 3.0  # mean(cached 2, new 4)


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
