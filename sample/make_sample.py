"""Generate the bundled sample corpus: real (synthetic) speech in the exact LLaSO record format.

    python sample/make_sample.py                 # rewrite sample/audio/ and sample/LLaSO-*/ in place
    python sample/make_sample.py --out /tmp/s    # write the same corpus elsewhere (e.g. to diff it)

Needs `espeak-ng` and `sox` on PATH (apt packages of the same names) and Python with soundfile.
Every clip is synthesised by espeak-ng (22.05 kHz), then sox trims the silence, pads 0.05 s on each side,
peak-normalises to -1 dBFS and resamples to 16 kHz mono 16-bit PCM (no dither, so the output is repeatable).

What it makes (all audio paths are relative to `sample/audio/`, the `--audio-root`):
    LLaSO-Align/text_audio/ASR_stage1_train.json               (t,a) ASR, 10 instruction phrasings
    LLaSO-Instruct/text_audio/{ASR, vctk_gender_classification, vctk_accent_classification,
                               slurp_Intent_Prediction, dolly_input_1}_train.json
    LLaSO-Instruct/audio_text/dolly_instruction_0_train.json    (a,t) spoken instruction + text input
    LLaSO-Instruct/pure_audio/alpaca_gpt4_end_train.json        (a)   spoken question
    LLaSO-Instruct/merged/stage2_train.json                     the seven Instruct files concatenated
    LLaSO-Eval/<same folders>/<stem>_test.json                  held-out sentences, commands and voices
The JSON depends only on the tables below (never on the audio), so re-running reproduces it byte for byte;
with the same espeak-ng and sox builds the WAVs are byte-identical too.
"""

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

SAMPLE_RATE = 16_000
BASE_WPM = 175                          # espeak-ng's default speaking rate
SPEEDS = (0.8, 1.0, 1.2)                # x BASE_WPM; written into file names like LLaSO's TTS clips
MIN_SECONDS, MAX_SECONDS = 0.5, 6.0

# ---------------------------------------------------------------------------------------------------------
# speakers: an espeak-ng voice (accent) plus a variant (+mN male, +fN female)


@dataclass(frozen=True)
class Speaker:
    name: str
    espeak: str
    gender: str
    accent: str


TRAIN_SPEAKERS = [
    Speaker("us_m3", "en-us+m3", "Male", "American"),
    Speaker("us_f2", "en-us+f2", "Female", "American"),
    Speaker("gb_m1", "en-gb+m1", "Male", "British"),
    Speaker("gb_f3", "en-gb+f3", "Female", "British"),
    Speaker("rp_m7", "en-gb-x-rp+m7", "Male", "British"),
    Speaker("rp_f4", "en-gb-x-rp+f4", "Female", "British"),
    Speaker("sc_m2", "en-gb-scotland+m2", "Male", "Scottish"),
    Speaker("sc_f1", "en-gb-scotland+f1", "Female", "Scottish"),
    Speaker("ca_m4", "en-029+m4", "Male", "Caribbean"),
    Speaker("ca_f5", "en-029+f5", "Female", "Caribbean"),
]
# held out: voice/variant pairs never heard in training (one per accent, two male, two female)
EVAL_SPEAKERS = [
    Speaker("nyc_m6", "en-us-nyc+m6", "Male", "American"),
    Speaker("wm_f2", "en-gb-x-gbcwmd+f2", "Female", "British"),
    Speaker("sc_m5", "en-gb-scotland+m5", "Male", "Scottish"),
    Speaker("ca_f3", "en-029+f3", "Female", "Caribbean"),
]
ACCENTS = ["American", "British", "Scottish", "Caribbean"]

# ---------------------------------------------------------------------------------------------------------
# text: sentences, prompts and answers (all written for this project)

TRAIN_SENTENCES = [
    "The red kite flew over the quiet harbour.",
    "Please close the window before it starts to rain.",
    "My brother bakes fresh bread every Sunday morning.",
    "The train to the coast leaves at noon.",
    "She found an old map inside the wooden chest.",
    "We walked along the river until sunset.",
    "The library opens early on weekdays.",
    "A small dog barked at the passing bus.",
    "He painted the garden fence a pale green.",
    "The soup tastes better with a little salt.",
    "Our teacher read us a story about dragons.",
    "The market was crowded on Saturday afternoon.",
    "Turn left at the church and keep going.",
    "The children built a castle out of sand.",
    "I left my umbrella on the kitchen table.",
    "The moon was bright above the silent hills.",
    "They planted apple trees behind the farmhouse.",
    "The coffee in this cafe is very strong.",
    "A cold wind blew across the empty field.",
    "She plays the violin in a small orchestra.",
    "The bridge was closed for repairs last week.",
    "We need more paper for the printer.",
    "The old clock in the hall stopped at midnight.",
    "He forgot to water the plants again.",
    "The museum has a new exhibition about ships.",
    "Fresh snow covered the roofs of the village.",
    "My sister is learning to drive this summer.",
    "The baker sold out of cakes by lunchtime.",
    "Birds were singing in the tall oak tree.",
    "Please write your name at the top of the page.",
    "The ferry crossed the bay in calm weather.",
    "A yellow balloon floated above the crowd.",
    "The kettle is boiling in the kitchen.",
    "They watched the stars from the rooftop.",
    "The shop on the corner sells fresh flowers.",
    "Her grandmother knits warm scarves for everyone.",
    "The lecture was long but very interesting.",
    "We heard thunder far away in the mountains.",
    "The farmer fed the horses before breakfast.",
    "This path leads down to a hidden beach.",
]
EVAL_SENTENCES = [
    "The blue boat drifted slowly toward the shore.",
    "He keeps his tools in a metal box.",
    "The orange cat slept on the warm windowsill.",
    "Our neighbours are painting their front door.",
    "The bakery smells of cinnamon and sugar.",
    "She wrote a long letter to her cousin.",
    "Rain fell softly on the glass roof.",
    "The students cheered when the bell rang.",
    "A tall lighthouse stands at the end of the pier.",
    "He carried the heavy boxes up the stairs.",
    "The forest path was covered in fallen leaves.",
    "We bought fresh fish at the harbour market.",
]

ASR_PROMPTS = [
    "Please transcribe the audio.",
    "Transcribe the speech in this clip and return only the transcript.",
    "Listen to the audio and write down exactly what is said.",
    "Convert the spoken words in this recording to text. Return only the transcript.",
    "What does the speaker say? Reply with the transcript only.",
    "Write out the words spoken in the following audio, without any extra comments.",
    "Provide an exact transcription of this audio clip.",
    "Turn this speech into written text and give only the transcript.",
    "Listen carefully and transcribe the spoken content word for word.",
    "Please produce a verbatim transcript of the following recording.",
]
GENDER_PROMPTS = [
    "What is the gender of the speaker in this audio? Choose only one: Male, Female.",
    "Is the speaker male or female? Answer with Male or Female only.",
    "Listen to the clip and identify the speaker's gender. Options: Male, Female.",
    "Based on the voice, what gender is the speaker? Reply with only Male or Female.",
    "Identify the gender of the person speaking. Return only one of: Male, Female.",
    "Which gender does this voice belong to? Pick one: Male, Female.",
]
ACCENT_PROMPTS = [
    "Which accent does the speaker have? Answer with one of: American, British, Scottish, Caribbean.",
    "Identify the accent in this audio clip. Choose only from: American, British, Scottish, Caribbean.",
    "What accent is the speaker using? Return only one of: American, British, Scottish, Caribbean.",
    "Listen to the speaker and name their accent. Options: American, British, Scottish, Caribbean.",
    "Classify the speaker's accent. Reply with only American, British, Scottish or Caribbean.",
    "From the audio, which accent can you hear? Pick one: American, British, Scottish, Caribbean.",
]
INTENT_PROMPTS = [
    "What is the intent behind this audio clip? Answer without any extra explanation.",
    "Identify the speaker's intent in this clip without any elaboration.",
    "What does the speaker want to do? Give only the intent label.",
    "Determine the intent of this spoken request without additional comments.",
    "Classify the intent of the command in this audio. Return only the intent.",
    "Please identify the intent of the speaker in this audio without any extra explanation.",
]
# SLURP-style labels, spelled as in the real LLaSO golds; three training commands and one held-out each
INTENTS = {
    "Iot hue lightoff": ["Turn off the kitchen lights.", "Switch the lights off in the bedroom.",
                         "Lights off please.", "Please turn the living room lights off."],
    "Iot hue lighton": ["Turn on the lights in the hallway.", "Switch the bedroom lights on.",
                        "Put the lights on please.", "Can you turn the office lights on?"],
    "Alarm set": ["Wake me up at seven tomorrow.", "Set an alarm for six in the morning.",
                  "Please set an alarm for noon.", "Set my alarm for eight tonight."],
    "Weather query": ["What is the weather like today?", "Will it rain tomorrow?",
                      "Do I need a coat this afternoon?", "How hot will it be this weekend?"],
    "Play music": ["Play some jazz music.", "Put on my favourite playlist.",
                   "I want to listen to some rock songs.", "Play something relaxing on the speaker."],
    "Datetime query": ["What time is it right now?", "What is the date today?",
                       "What day of the week is it?", "Tell me the current time."],
    "Audio volume up": ["Turn the volume up.", "Make it louder please.",
                        "Increase the sound a little.", "Raise the volume on the speaker."],
    "Iot coffee": ["Make me a cup of coffee.", "Start the coffee machine.",
                   "I would like a fresh coffee please.", "Brew some coffee for me."],
}
# (a) pure audio: a generic text prompt, the question is in the audio
PURE_AUDIO_PROMPTS = [
    "Listen to this audio carefully and share your answer.",
    "Listen to the audio and respond accordingly.",
    "Answer the question asked in the audio.",
    "Follow the instruction given in the audio and reply briefly.",
    "The speaker is asking you something. Please respond.",
    "Respond to the spoken request in this clip.",
]
TRAIN_QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
]
EVAL_QUESTIONS = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What colour is fresh grass?", "Fresh grass is green."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What do cows drink?", "Cows drink water."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
]

NUMBER_WORDS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
                "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen"]


def words(text):
    return re.findall(r"[A-Za-z']+", text)


# (a,t) instruction_0: the spoken instruction works on the text after <audio>
SPOKEN_INSTRUCTIONS = [
    ("Repeat the following text exactly.", lambda t: t),
    ("What is the first word of the following text?", lambda t: words(t)[0]),
    ("What is the last word of the following text?", lambda t: words(t)[-1]),
    ("How many words are in the following text?", lambda t: NUMBER_WORDS[len(words(t))] + "."),
    ("Rewrite the following text in capital letters.", lambda t: t.upper()),
]
# (t,a) input_1: the text question is about what the audio says
INPUT_QUESTIONS = [
    ("What is the first word spoken in this audio?", lambda t: words(t)[0]),
    ("How many words does the speaker say?", lambda t: NUMBER_WORDS[len(words(t))] + "."),
    ("What is the last word spoken in this audio?", lambda t: words(t)[-1]),
    ("Repeat what the speaker said.", lambda t: t),
]

# ---------------------------------------------------------------------------------------------------------
# audio


def synthesise(text, speaker, speed, wav_path):
    """espeak-ng -> sox (trim, pad, normalise, 16 kHz mono s16, no dither); checks format and duration."""
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", speaker.espeak, "-s", str(round(BASE_WPM * speed)),
                        "-w", str(raw), text], check=True)
        subprocess.run(["sox", "-D", "-R", "-V1", str(raw),
                        "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", str(wav_path),
                        "silence", "1", "0.02", "0.1%", "reverse", "silence", "1", "0.02", "0.1%", "reverse",
                        "pad", "0.05", "0.05", "gain", "-n", "-1"], check=True)
    info = sf.info(str(wav_path))
    if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
        raise RuntimeError(f"{wav_path}: got {info.samplerate} Hz, {info.channels} ch, {info.subtype}")
    if not MIN_SECONDS <= info.duration <= MAX_SECONDS:
        raise RuntimeError(f"{wav_path}: {info.duration:.2f} s is outside {MIN_SECONDS}-{MAX_SECONDS} s "
                           f"(text {text!r}); shorten or lengthen the sentence")


@dataclass(frozen=True)
class Split:
    name: str                           # file suffix: train | test
    corpus: str                         # LLaSO-Instruct | LLaSO-Eval
    audio: str                          # audio sub-folder
    speakers: list
    sep: str                            # between audio folders in record paths; the file name always follows "\\"


# real LLaSO paths come in both forms: "dolly_input\\4227_EN-US_1.2_7.wav" and "slurp/data\\audio-149.wav"
TRAIN = Split("train", "LLaSO-Instruct", "instruct", TRAIN_SPEAKERS, "\\")
TEST = Split("test", "LLaSO-Eval", "eval", EVAL_SPEAKERS, "/")


def speak(clips, split, folder, stem, texts, by_speaker=False):
    """Registers one clip per text (speakers and speeds in turn); returns [(record path, metadata)]."""
    out = []
    for i, text in enumerate(texts):
        spk, speed = split.speakers[i % len(split.speakers)], SPEEDS[i % len(SPEEDS)]
        voice, variant = spk.espeak.split("+")
        name = f"{stem}_{i + 1:04d}_{voice.upper()}_{speed}_{variant}.wav"   # LLaSO TTS: {id}_{voice}_{speed}_{spk}
        path = (f"{folder}/{spk.name}" if by_speaker else folder).replace("/", split.sep) + "\\" + name
        clips[path] = (text, spk, speed)
        out.append((path, {"text": text, "speaker": spk.name, "espeak_voice": spk.espeak,
                           "gender": spk.gender, "accent": spk.accent, "speed": speed}))
    return out


def records(prefix, utterances, humans, golds):
    out = []
    for k, ((path, metadata), human, gold) in enumerate(zip(utterances, humans, golds, strict=True)):
        assert human.count("<audio>") == 1, human
        out.append({"id": f"{prefix}-{k + 1:04d}", "voice": [path],
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gold}],
                    "metadata": metadata})
    return out


def cycle(prompts, n, suffix="<audio>"):
    return [prompts[k % len(prompts)] + suffix for k in range(n)]


# ---------------------------------------------------------------------------------------------------------
# corpus

# speech clips reused by several (t,a) tasks, as real corpora reuse one recording for ASR, gender and accent
REUSE = {"train": {"ASR": slice(16, 32), "gender": slice(0, 24), "accent": slice(16, 40), "input_1": slice(0, 16)},
         "test": {"ASR": slice(None), "gender": slice(None), "accent": slice(None), "input_1": slice(0, 8)}}


def build(clips):
    """Returns {json path relative to sample/: [records]}; registers every clip in `clips`."""
    speech = {"train": speak(clips, TRAIN, "align", "align", TRAIN_SENTENCES, by_speaker=True),
              "test": speak(clips, TEST, "eval/speech", "speech", EVAL_SENTENCES, by_speaker=True)}
    align = speech["train"]
    files = {"LLaSO-Align/text_audio/ASR_stage1_train.json": records(
        "align-asr", align, cycle(ASR_PROMPTS, len(align)), [m["text"] for _, m in align])}

    for split in (TRAIN, TEST):
        def put(config, stem, recs):
            files[f"{split.corpus}/{config}/{stem}_{split.name}.json"] = recs

        def reuse(task):
            return speech[split.name][REUSE[split.name][task]]

        # ---- text_audio (t,a): text instruction first, the audio is the signal or the input
        u = reuse("ASR")
        put("text_audio", "ASR", records(f"{split.audio}-asr", u, cycle(ASR_PROMPTS, len(u)),
                                         [m["text"] for _, m in u]))
        u = reuse("gender")
        put("text_audio", "vctk_gender_classification", records(
            f"{split.audio}-gender", u, cycle(GENDER_PROMPTS, len(u)), [m["gender"] + "." for _, m in u]))
        u = reuse("accent")
        put("text_audio", "vctk_accent_classification", records(
            f"{split.audio}-accent", u, cycle(ACCENT_PROMPTS, len(u)), [m["accent"] + "." for _, m in u]))
        u = reuse("input_1")
        asks = [INPUT_QUESTIONS[k % len(INPUT_QUESTIONS)] for k in range(len(u))]
        put("text_audio", "dolly_input_1", records(f"{split.audio}-dolly-input", u, [q + "<audio>" for q, _ in asks],
                                                   [answer(m["text"]) for (_, answer), (_, m) in zip(asks, u)]))
        held_out = split is TEST            # the last command of each intent is kept for the test split
        labels = [label for label, commands in INTENTS.items() for c in commands if (c == commands[-1]) == held_out]
        commands = [c for cs in INTENTS.values() for c in cs if (c == cs[-1]) == held_out]
        u = speak(clips, split, f"{split.audio}/slurp", "command", commands)
        for (_, metadata), label in zip(u, labels):
            metadata["intent"] = label
        put("text_audio", "slurp_Intent_Prediction", records(
            f"{split.audio}-intent", u, cycle(INTENT_PROMPTS, len(u)), labels))

        # ---- audio_text (a,t): the spoken instruction first, then the text it works on
        n_clips, per_clip, texts = (10, 2, TRAIN_SENTENCES[::-1]) if split is TRAIN else (6, 1, EVAL_SENTENCES[::-1])
        said = [SPOKEN_INSTRUCTIONS[k % len(SPOKEN_INSTRUCTIONS)] for k in range(n_clips)]
        u = speak(clips, split, f"{split.audio}/dolly_instruction", "instruction", [s for s, _ in said])
        u, said = [x for x in u for _ in range(per_clip)], [x for x in said for _ in range(per_clip)]
        texts = [texts[k % len(texts)] for k in range(len(u))]
        put("audio_text", "dolly_instruction_0", records(
            f"{split.audio}-dolly-instruction", u, ["<audio>" + t for t in texts],
            [answer(t) for (_, answer), t in zip(said, texts)]))

        # ---- pure_audio (a): a generic text prompt, the question is spoken
        questions = TRAIN_QUESTIONS if split is TRAIN else EVAL_QUESTIONS
        u = speak(clips, split, f"{split.audio}/alpaca_gpt4", "question", [q for q, _ in questions])
        put("pure_audio", "alpaca_gpt4_end", records(
            f"{split.audio}-alpaca-end", u, cycle(PURE_AUDIO_PROMPTS, len(u)), [a for _, a in questions]))

    # the reference trains stage 2 on one merged file (LLaSO-Instruct's merged release); same records, Instruct files in order
    files["LLaSO-Instruct/merged/stage2_train.json"] = [
        r for rel, recs in files.items() if rel.startswith("LLaSO-Instruct/") for r in recs]
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write audio/ and LLaSO-*/ into (default: this script's folder)")
    args = parser.parse_args()

    for generated in ("audio", "LLaSO-Align", "LLaSO-Instruct", "LLaSO-Eval"):
        shutil.rmtree(args.out / generated, ignore_errors=True)
    clips = {}                          # record path -> (text, speaker, speed)
    files = build(clips)
    for rel, recs in sorted(files.items()):
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{len(recs):4d} records  {rel}")
    for rel, (text, speaker, speed) in clips.items():
        synthesise(text, speaker, speed, args.out / "audio" / rel.replace("\\", "/"))
    print(f"{len(clips)} clips -> {args.out / 'audio'}")


if __name__ == "__main__":
    main()
