"""Benchmarks of llaso-mini. Each one is a function below; main() runs the ones named on the command line.

    python bench.py                    # every benchmark; data ones on a generated 1M-record corpus (0.4 GB, tmp)
    python bench.py --quick            # 100k records, fewer reads and batches
    python bench.py index access       # a selection: index, access, preflight, loader, eval
    python bench.py eval --threads 1   # evaluation: batch 1 vs 16 (CPU, and CUDA if present)
    python bench.py tokens             # --stack 5 / --trim-audio: LLM positions and stage-2 step time
    python bench.py gpu                # stage 1, stage 2, evaluation on one GPU (llaso-random; tiny on CPU)

Evaluation target: batch 16 >= 3x the records/s of batch 1 with identical answers (tiny preset, 128 new tokens).
GPU target: `bench.py gpu` (stage 1, stage 2, evaluation of llaso-random) within 8 minutes on one H100/H200.
Data targets (on the 1M-record file): index build <= 150 MB peak RSS, random access <= 1 ms. The index is built once
per corpus file and cached, so its speed is reported but has no target.
Timings and peak RSS of the index build, json.load and the preflight come from separate processes (os.wait4
reports each one's peak RSS, imports included), so one measurement cannot inflate another.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "sample"

# ---------------------------------------------------------------------------------------------------- helpers

INSTRUCTIONS = [
    "Please transcribe the audio.",
    "Transcribe the speech into text.",
    "What is the gender of the speaker? Answer with one of: Male, Female.",
    "Which accent does the speaker have? Choose one of: American, Canadian, English, Irish, Scottish.",
    "Listen to this audio carefully and share your answer.",
]
WORDS = "the a of and to in is was he that it for on with as his they be at one have this from or had by".split()
NON_ASCII = ["café", "naïve", "Zoë", "“quoted”", "São Paulo", "it’s"]


def llaso_record(i: int, rng: random.Random) -> dict:
    """A record shaped like LLaSO-Instruct's: backslash path, instruction + <audio>, answer, passthrough metadata."""
    words = rng.choices(WORDS, k=rng.randint(5, 40))
    if rng.random() < 0.02:  # a few records with non-ASCII text, as in real transcripts and answers
        words[0] = rng.choice(NON_ASCII)
    instruction = rng.choice(INSTRUCTIONS)
    human = f"<audio>{instruction}" if i % 4 == 0 else f"{instruction}<audio>"
    return {"id": f"rec-{i:07d}", "voice": [f"librispeech\\train-clean-100\\{i % 2000}\\{i}_EN-US_1.0_{i % 7}.flac"],
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": " ".join(words) + "."}],
            "metadata": {"speaker_id": i % 2000, "gender": rng.choice(["Male", "Female"]), "duration": 4.2}}


def write_corpus(path: Path, n: int) -> Path:
    """One JSON list of n records, one record per line (json.dumps with the C encoder; indent would take minutes)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            f.write((",\n" if i else "") + json.dumps(llaso_record(i, rng), ensure_ascii=False))
        f.write("\n]\n")
    return path


def measured(code: str) -> tuple[dict, float, float]:
    """Run python code in a fresh process: (the JSON it prints last, wall seconds, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"benchmark process failed ({status}):\n{code}")
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}, time.perf_counter() - start, usage.ru_maxrss / 1024


def corpus_file(args) -> Path:
    """The generated corpus, written once per run."""
    path = Path(args.workdir) / f"llaso_{args.records}.json"
    if not path.exists():
        t = time.perf_counter()
        write_corpus(path, args.records)
        print(f"generated {path} ({args.records:,} records, {path.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t:.0f} s")
    return path


# ---------------------------------------------------------------------------------------------------- data

INDEX_RSS_MB = 150  # peak RSS bound of the index build, python and imports included


def bench_index(args):
    """Index build: records/s and peak RSS, against json.load of the same file."""
    path = corpus_file(args)
    index = Path(args.workdir) / "bench.idx"
    build, _, rss = measured(
        "import json, time; from pathlib import Path; import data\n"
        "t = time.perf_counter(); c = time.process_time()\n"
        f"data.build_index(Path({str(path)!r}), Path({str(index)!r}))\n"
        "print(json.dumps({'wall': time.perf_counter() - t, 'cpu': time.process_time() - c}))")
    print(f"index build, one pass: {args.records / build['wall']:,.0f} records/s ({build['wall']:.1f} s wall, "
          f"{args.records / build['cpu']:,.0f} records/s of CPU time), peak RSS {rss:.0f} MB "
          f"({'within' if rss <= INDEX_RSS_MB else 'OVER'} the {INDEX_RSS_MB} MB bound)")
    _, _, base_rss = measured("import json, data; print('{}')")
    print(f"  python + data.py imports alone: peak RSS {base_rss:.0f} MB")
    if args.skip_json_load:
        return
    loaded, _, rss = measured(
        "import json, time\nt = time.perf_counter()\n"
        f"records = json.load(open({str(path)!r}, encoding='utf-8'))\n"
        "print(json.dumps({'wall': time.perf_counter() - t}))")
    print(f"json.load:   {args.records / loaded['wall']:,.0f} records/s ({loaded['wall']:.1f} s), "
          f"peak RSS {rss:.0f} MB")


def bench_access(args):
    """Random record access through the memory-mapped index (warm page cache)."""
    import data

    path = corpus_file(args)
    corpus = data.Corpus(path, cache_dir=args.workdir)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(corpus), args.reads)
    times = []
    for i in picks:
        t = time.perf_counter()
        corpus.read(int(i))
        times.append(time.perf_counter() - t)
    us = np.array(times) * 1e6
    print(f"random access: mean {us.mean():.0f} µs, median {np.median(us):.0f} µs, "
          f"p99 {np.percentile(us, 99):.0f} µs, max {us.max():.0f} µs ({args.reads:,} reads of {len(corpus):,})")


def bench_preflight(args):
    """The preflight CLI over the generated corpus (index reused, every record parsed and checked; no audio)."""
    path = corpus_file(args)
    result, wall, rss = measured(
        "import io, json, data\nout = io.StringIO()\n"
        f"code = data.preflight([{str(path)!r}], cache_dir={str(args.workdir)!r}, out=out)\n"
        "print(json.dumps({'code': code}))")
    print(f"preflight: {args.records / wall:,.0f} records/s ({wall:.1f} s incl. start-up), peak RSS {rss:.0f} MB, "
          f"exit code {result['code']}")


def bench_loader(args):
    """Batches/s of the DataLoader on the sample corpus: tiny tokenizer, 128-mel features made in workers."""
    import data
    import model

    config = model.preset("tiny")
    _, tokenizer = model.load_llm(config.llm)
    features = model.WhisperFeatureExtractor.from_pretrained(config.encoder)
    corpus = data.Corpus(SAMPLE / "LLaSO-Instruct" / "merged" / "stage2_train.json", cache_dir=args.workdir)
    dataset = data.LLaSODataset(corpus, tokenizer, features, SAMPLE / "audio")
    micro_batch = 4
    for workers in args.workers:
        sampler = data.StepSampler(data.shuffled_order(len(corpus), 42, 0), micro_batch)
        loader = iter(data.make_loader(dataset, sampler, workers))
        next(loader)  # worker start-up is not part of the rate
        n, t = 0, time.perf_counter()
        for batch in loader:
            n += 1
            if n == args.batches:
                break
        rate = n / (time.perf_counter() - t)
        print(f"loader, {workers} workers: {rate:.1f} batches/s of {micro_batch} records "
              f"({rate * micro_batch:.0f} records/s, 1 chunk = 128x3000 log-mel each)")


# ---------------------------------------------------------------------------------------------------- evaluation


def timed_generation(llaso, dataset, order: list, batch_size: int, workers: int, tokens: int) -> tuple[list, float]:
    """The answers (token ids) to the records `order` in batches of `batch_size`, and records/s; the first batch's
    loading (worker start-up) is not counted."""
    import torch

    import data

    loader = iter(data.make_loader(dataset, [order[b : b + batch_size] for b in range(0, len(order), batch_size)],
                                   workers))
    batch, out, t = next(loader), [], time.perf_counter()
    while batch is not None:
        out += llaso.generate_ids(batch, tokens)
        batch = next(loader, None)
    if llaso.projector[0].weight.is_cuda:
        torch.cuda.synchronize()
    return out, len(order) / (time.perf_counter() - t)


def bench_eval(args):
    """Records/s of LLaSO-Eval generation (log-mels in a worker, encoder, prefill, greedy loop) at batch 1 and
    batched, tiny preset with large random LLM weights, on the sample eval set; the answers must be identical.

    Rates are steady state: model loading, worker start-up and the first batch's loading are not counted.
    """
    import torch

    import data
    import evaluate
    import model

    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model.preset("tiny")  # built (seeding torch) before the projector is drawn: same weights every run
    torch.manual_seed(0)
    llaso = model.LLaSO.from_parts(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: varied, input-dependent answers without near-ties (tests' sharpen)
        for p in llaso.llm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ckpt = Path(args.workdir) / "eval-ckpt"
    llaso.save(ckpt, with_llm=True)  # loaded back as evaluate.py loads it, per device
    corpus = data.Corpus(sorted((SAMPLE / "LLaSO-Eval").rglob("*_test.json")), cache_dir=args.workdir)
    dataset = data.LLaSODataset(corpus, llaso.tokenizer, llaso.features, SAMPLE / "audio", eval_mode=True)
    order = [i % len(corpus) for i in range(args.eval_records)]
    for device in devices:
        llaso = evaluate.load_model(ckpt, device=device)  # bf16 on CUDA, fp32 on CPU
        answers, rates = {}, {1: [], args.eval_batch: []}
        for _ in range(args.eval_repeats):  # alternating, so a slow spell of a shared machine hits both sides
            for batch_size in rates:
                answers[batch_size], rate = timed_generation(llaso, dataset, order, batch_size, args.eval_workers,
                                                             args.eval_tokens)
                rates[batch_size].append(rate)
        for batch_size, runs in rates.items():
            print(f"eval {device}, batch {batch_size:>2}: {statistics.median(runs):6.2f} records/s median of "
                  f"{', '.join(f'{r:.2f}' for r in runs)} ({sum(map(len, answers[batch_size])) / len(order):.0f} "
                  f"new tokens per record, {torch.get_num_threads()} threads, {args.eval_workers} workers)")
        differ = sum(a != b for a, b in zip(answers[1], answers[args.eval_batch]))
        ratio = statistics.median(rates[args.eval_batch]) / statistics.median(rates[1])
        print(f"eval {device}: batch {args.eval_batch} is {ratio:.2f}x batch 1 (medians); "
              f"{len(order) - differ} of {len(order)} answers identical")


# ---------------------------------------------------------------------------------------------------- audio tokens

TOKEN_VARIANTS = [("K=1, padded (LLaSO)", 1, False), ("K=5, padded", 5, False), ("K=5, trimmed", 5, True)]


def real_model_on_meta(stack: int, trim: bool, tokenizer):
    """Whisper-large-v3's encoder + Llama-3.2-3B-Instruct (with LLaSO's 5 new rows) on the meta device: the real
    shapes for align.batch_flops, no weights. The encoder is frozen, as in the recipe."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig

    import model

    shapes = model.make_models()  # the real architectures, as the llaso-random preset writes them
    whisper = WhisperConfig(**shapes.WHISPER_LARGE_V3)
    llama = LlamaConfig(**{**shapes.LLAMA_32_3B_INSTRUCT, "vocab_size": 128_256 + 5})
    with torch.device("meta"):
        encoder, llm = model.WhisperEncoder(whisper).requires_grad_(False), LlamaForCausalLM(llama)
        projector = model.make_projector(1280, 3072, stack)
    config = model.ModelConfig(stack=stack, trim_audio=trim)
    return model.LLaSO(config, encoder, None, projector, llm, tokenizer)


def bench_tokens(args):
    """--stack 5 and --trim-audio against LLaSO's 1500 padded positions per chunk, in one run: LLM positions per
    record over the sample corpus, stage-2 step time of the tiny preset (micro-batch 1, activation checkpointing,
    AdamW; variants alternate, medians), and a stage-2 step's model FLOPs for the real model (align.batch_flops on
    the meta device; text ids counted with the tiny tokenizer)."""
    import torch

    import align
    import data
    import model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = model.preset("tiny")
    corpus = data.Corpus(SAMPLE / "LLaSO-Instruct" / "merged" / "stage2_train.json", cache_dir=args.workdir)
    torch.manual_seed(0)
    tokenizer = model.load_llm(config.llm)[1]
    features = model.WhisperFeatureExtractor.from_pretrained(config.encoder)
    dataset = data.LLaSODataset(corpus, tokenizer, features, SAMPLE / "audio")
    records = [data.collate([dataset[i]]) for i in range(len(corpus))]  # micro-batch 1, as stage 2
    timed = records[:: max(1, len(records) // args.token_steps)][: args.token_steps]
    rows, steps = [], {name: [] for name, _, _ in TOKEN_VARIANTS}
    for name, stack, trim in TOKEN_VARIANTS:
        torch.manual_seed(0)
        llaso = model.LLaSO.from_parts(model.ModelConfig(config.encoder, config.llm, stack=stack, trim_audio=trim))
        llaso.llm.activation_checkpointing_enable({"use_reentrant": False})
        llaso.encoder.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in llaso.parameters() if p.requires_grad], lr=1e-5)
        positions = [n for batch in records for n in align.llm_positions(llaso, batch)]
        meta = real_model_on_meta(stack, trim, tokenizer)
        flops = sum(align.batch_flops(meta, batch, train_llm=True) for batch in records) / len(records)
        rows.append((name, llaso.train(), optimizer, positions, flops))
    for _ in range(args.token_repeats):  # alternating, so a slow spell of a shared machine hits every variant
        for name, llaso, optimizer, _, _ in rows:
            for batch in timed:
                t = time.perf_counter()
                llaso(batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps[name].append(time.perf_counter() - t)
    base_positions, base_step, base_flops = sum(rows[0][3]), statistics.median(steps[rows[0][0]]), rows[0][4]
    print(f"audio tokens, sample corpus ({len(records)} stage-2 records, {len(timed)} timed steps x "
          f"{args.token_repeats} per variant, {torch.get_num_threads()} threads):")
    print(f"| | LLM positions / record (mean) | total | stage-2 step, tiny (median) | real model: stage-2 FLOPs "
          f"/ record |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _, positions, flops in rows:
        step = statistics.median(steps[name])
        print(f"| {name} | {np.mean(positions):,.0f} | {sum(positions):,} (÷{base_positions / sum(positions):.1f}) "
              f"| {step * 1e3:.0f} ms (÷{base_step / step:.1f}) | {flops / 1e12:.1f} TFLOP "
              f"(÷{base_flops / flops:.1f}) |")


# ---------------------------------------------------------------------------------------------------- GPU

# Micro-batches per optimizer step in the gpu bench: the optimizer's share of a step shows, and 6 steps per stage fit
# the 8-minute budget (the recipe's 32 repeat the same micro-step).
GPU_ACCUM = 4
GPU_BUDGET_S = 480  # the whole gpu bench on one H100/H200, the preset's first-use writing included


def start_phase():
    """Free what the last phase left, and restart the peak-memory count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated since the phase started (None on CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def timed_stage(main, argv: list, out: Path) -> dict:
    """One stage through align.py's training loop on the sample corpus, then the medians of its log.jsonl lines
    after the first (warm-up: CUDA kernels, allocator, loader start-up). Its checkpoints are not written: for stage 2
    they would gather and write the LLM's fp32 weights and AdamW state (~39 GB for the 3B model), which is not what
    this bench measures and more than a benchmark machine's disk may hold. The final model is written."""
    import align

    start_phase()
    save_checkpoint, align.save_checkpoint = align.save_checkpoint, lambda *args, **kwargs: None
    try:
        main(argv)
    finally:
        align.save_checkpoint = save_checkpoint
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]

    def median(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps_timed": len(steps), "step_s": median("step_s"), "tokens_per_s": median("tokens_per_s"),
            "mfu": median("mfu"), "peak_gib": peak_gib()}


def bench_gpu(args):
    """Stage-1 and stage-2 steps and evaluation of one model on one device (a GPU if there is one): step time, LLM
    tokens/s, MFU and peak GPU memory per phase; evaluation records/s at batch 1 vs --eval-batch, with the answers
    compared. Stages run align.py's loop (align.main / instruct.main) on the sample corpus, evaluation runs
    evaluate.load_model + generate_ids on the stage-2 model. Prints a table and writes --gpu-json."""
    import torch

    import align
    import data
    import evaluate
    import instruct
    import model

    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    preset = args.preset or ("llaso-random" if cuda else "tiny")
    config = model.preset(preset)  # llaso-random: 7.7 GB of weights written to the cache on first use
    preset_s = time.perf_counter() - t0
    work = Path(args.workdir)
    common = ["--encoder", config.encoder, "--llm", config.llm, "--audio-root", str(SAMPLE / "audio"),
              "--grad-accum", str(GPU_ACCUM), "--max-steps", str(args.gpu_steps), "--warmup-ratio", "0",
              "--workers", str(4 if cuda else 0), "--index-dir", str(work / "index"), "--overwrite"]
    stage1 = timed_stage(align.main, common + [
        "--data", str(SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json"), "--batch-size", "2",
        "--out", str(work / "stage1")], work / "stage1")
    stage2 = timed_stage(instruct.main, common + [
        "--data", str(SAMPLE / "LLaSO-Instruct/merged/stage2_train.json"), "--batch-size", "1",
        "--projector", str(work / "stage1"), "--out", str(work / "stage2")], work / "stage2")

    start_phase()
    llaso = evaluate.load_model(work / "stage2", device="cuda" if cuda else "cpu")  # bf16 on CUDA, fp32 on CPU
    corpus = data.Corpus(sorted((SAMPLE / "LLaSO-Eval").rglob("*_test.json")), cache_dir=work / "index")
    dataset = data.LLaSODataset(corpus, llaso.tokenizer, llaso.features, SAMPLE / "audio", eval_mode=True)
    n = args.gpu_records
    order = [i * len(corpus) // n % len(corpus) for i in range(n)]  # spread over the test files
    timed_generation(llaso, dataset, order[:1], 1, 0, 2)  # warm-up, not counted
    evaluation, answers = {"records": n, "new_tokens": args.gpu_tokens}, {}
    for batch_size in (1, args.eval_batch):
        start_phase()
        answers[batch_size], rate = timed_generation(llaso, dataset, order, batch_size, args.eval_workers,
                                                     args.gpu_tokens)
        evaluation[f"batch_{batch_size}"] = {"records_per_s": rate, "peak_gib": peak_gib()}
    evaluation["identical"] = sum(a == b for a, b in zip(answers[1], answers[args.eval_batch]))
    evaluation["new_tokens_per_record"] = sum(map(len, answers[1])) / n

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "preset": preset, "torch": torch.__version__,
              "grad_accum": GPU_ACCUM, "steps": args.gpu_steps, "stage1": dict(micro_batch=2, **stage1),
              "stage2": dict(micro_batch=1, activation_checkpointing=True, **stage2), "eval": evaluation,
              "preset_s": preset_s, "wall_s": time.perf_counter() - t0}
    print_gpu_table(result, args.eval_batch)
    path = Path(args.gpu_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def print_gpu_table(result: dict, eval_batch: int):
    def number(value, fmt, unit=""):
        return "–" if value is None else format(value, fmt) + unit

    evaluation = result["eval"]
    print(f"{result['device']}, preset {result['preset']}: {result['steps']} steps per stage of {result['grad_accum']} "
          f"micro-batches (medians of the last {result['stage1']['steps_timed']}), evaluation of "
          f"{evaluation['records']} records x {evaluation['new_tokens']} new tokens max")
    print("| phase | step | LLM tokens/s | MFU | peak GPU memory |")
    print("|---|---:|---:|---:|---:|")
    for name, what in [("stage1", "stage 1, micro-batch 2"), ("stage2", "stage 2, micro-batch 1, act. checkpointing")]:
        r = result[name]
        print(f"| {what} | {r['step_s']:.3f} s | {r['tokens_per_s']:,.0f} | {number(r['mfu'], '.1%')} | "
              f"{number(r['peak_gib'], '.1f', ' GiB')} |")
    for batch_size in (1, eval_batch):
        r = evaluation[f"batch_{batch_size}"]
        print(f"| evaluation, batch {batch_size} | {r['records_per_s']:.2f} records/s | | | "
              f"{number(r['peak_gib'], '.1f', ' GiB')} |")
    ratio = evaluation[f"batch_{eval_batch}"]["records_per_s"] / evaluation["batch_1"]["records_per_s"]
    print(f"evaluation: batch {eval_batch} is {ratio:.2f}x batch 1; {evaluation['identical']} of "
          f"{evaluation['records']} answers identical ({evaluation['new_tokens_per_record']:.0f} new tokens per "
          f"record)")
    over = result["wall_s"] > GPU_BUDGET_S and result["device"] != "cpu"
    print(f"wall time {result['wall_s']:.0f} s (preset ready after {result['preset_s']:.0f} s)"
          + (f": OVER the {GPU_BUDGET_S} s budget" if over else ""))


BENCHMARKS = {"index": bench_index, "access": bench_access, "preflight": bench_preflight, "loader": bench_loader,
              "eval": bench_eval, "tokens": bench_tokens, "gpu": bench_gpu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--records", type=int, help="records in the generated corpus (default 1M, --quick 100k)")
    parser.add_argument("--reads", type=int, help="random reads (default 10k, --quick 1k)")
    parser.add_argument("--batches", type=int, help="loader batches timed (default 30, --quick 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--eval-records", type=int, help="records generated per batch size (default 64, --quick 32)")
    parser.add_argument("--eval-tokens", type=int, default=128, help="max new tokens per record in the eval bench")
    parser.add_argument("--eval-batch", type=int, default=16, help="batch size compared with batch 1")
    parser.add_argument("--eval-repeats", type=int, help="timed runs per batch size (default 3, --quick 1)")
    parser.add_argument("--eval-workers", type=int, default=1, help="DataLoader workers in the eval bench")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--token-steps", type=int, help="stage-2 steps timed per variant and repeat in the tokens "
                        "bench (default 16, --quick 4)")
    parser.add_argument("--token-repeats", type=int, help="alternating timed runs in the tokens bench (default 3, "
                        "--quick 1)")
    parser.add_argument("--preset", choices=["tiny", "llaso-random"], help="models of the gpu bench (default: "
                        "llaso-random on CUDA, tiny on CPU)")
    parser.add_argument("--gpu-steps", type=int, help="optimizer steps per stage in the gpu bench, the first not "
                        "timed (default 6, --quick 3)")
    parser.add_argument("--gpu-records", type=int, help="records generated per batch size in the gpu bench "
                        "(default 16, --quick 4)")
    parser.add_argument("--gpu-tokens", type=int, help="max new tokens per record in the gpu bench (default 128, "
                        "--quick 16)")
    parser.add_argument("--gpu-json", default=str(ROOT / "out" / "bench-gpu.json"), help="where the gpu bench "
                        "writes its results")
    parser.add_argument("--skip-json-load", action="store_true", help="skip the json.load comparison (~3 GB RAM)")
    parser.add_argument("--workdir", help="where the generated corpus and indexes go (default: a temp dir)")
    args = parser.parse_args(argv)
    unknown = set(args.benchmarks) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    args.records = args.records or (100_000 if args.quick else 1_000_000)
    args.reads = args.reads or (1_000 if args.quick else 10_000)
    args.batches = args.batches or (8 if args.quick else 30)
    args.eval_records = args.eval_records or (32 if args.quick else 64)
    args.eval_repeats = args.eval_repeats or (1 if args.quick else 3)
    args.token_steps = args.token_steps or (4 if args.quick else 16)
    args.token_repeats = args.token_repeats or (1 if args.quick else 3)
    args.gpu_steps = args.gpu_steps or (3 if args.quick else 6)
    args.gpu_records = args.gpu_records or (4 if args.quick else 16)
    args.gpu_tokens = args.gpu_tokens or (16 if args.quick else 128)
    with tempfile.TemporaryDirectory(prefix="llaso-bench-") as tmp:
        args.workdir = args.workdir or tmp
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        for name in args.benchmarks or BENCHMARKS:
            BENCHMARKS[name](args)


if __name__ == "__main__":
    main()
