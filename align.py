"""Stage 1 of LLaSO (alignment): train the projector on ASR, encoder and LLM frozen. Also the training loop of
both stages: instruct.py (stage 2) imports it and passes in what differs.

    config -> distributed set-up -> data -> model -> optimizer/schedule -> loop -> checkpoint -> final artifact

Tiny run on CPU (tiny random Whisper + Llama, the bundled sample corpus, a minute or two):

    python align.py --preset tiny                                   # one process
    torchrun --standalone --nproc_per_node=2 align.py --preset tiny  # two processes, gloo

One 8-GPU node, the paper's recipe (global batch 2 x 32 x 8 = 512, lr 1e-3, one epoch):

    torchrun --standalone --nproc_per_node=8 align.py \
        --data LLaSO-Align/ --audio-root /data/llaso/audio --out out/align

Several nodes (run the same command on every node; HEAD = address of any one of them; --out on shared storage):

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=align \
        align.py --data LLaSO-Align/ --audio-root /data/llaso/audio --out /shared/out/align

Outputs in --out: log.jsonl (one line per optimizer step), ckpt-NNNNNNN/ (resumable checkpoints, the last --keep),
and at the end projector.safetensors + llaso_config.json (LLaSO.load) and mm_audio_aligner.bin (the reference's
format). --resume continues from the newest checkpoint with the same batches and the same losses.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as D
import model as M

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "sample"

# ----------------------------------------------------------------------------------------------------------
# Config: defaults are the paper's stage-1 recipe (SPEC 7); --preset tiny swaps in tiny models and the sample


@dataclass
class Config:
    data: list = field(default_factory=list)  # corpus files or folders (required for the llaso preset)
    audio_root: str = ""  # folder the records' "voice" paths are relative to
    encoder: str = M.ModelConfig.encoder  # the paper's Whisper-large-v3
    llm: str = M.ModelConfig.llm  # the paper's Llama-3.2-3B-Instruct
    projector: str = ""  # start from this projector (stage 2: the stage-1 output); empty = fresh init
    init: str = ""  # stage 2: start from a whole model (a stage-2 artifact or the released LLaSO-Base checkpoint)
    out: str = "out/align"
    batch_size: int = 2  # micro-batch per device
    grad_accum: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.0015
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm; 0 = no clipping (what the reference's DeepSpeed run most likely did)
    epochs: int = 1
    max_steps: int = 0  # 0 = as many as the epochs give; otherwise caps the run (and the LR schedule)
    stop_after: int = 0  # stop this session after this step (job time limits); the schedule is unchanged
    seed: int = 42
    save_every: int = 100
    keep: int = 20
    resume: bool = False
    strict: bool = False
    compat_chunks: bool = False  # the reference's 480,001-sample slicing of long audio (SPEC 2)
    workers: int = 4
    fsdp: bool = False
    peak_tflops: float = 0.0  # per-GPU bf16 peak for MFU; 0 = guess from the GPU name


# The tiny preset: models that fit a CPU, the sample corpus, batches small enough for a few minutes. The tiny
# random LLM learns nothing in minutes at the paper's learning rates, so they are raised, and a few epochs
# over the 40 (stage 1) / 136 (stage 2) sample records make the loss curve visible.
TINY = {
    1: dict(data=[str(SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json")], out="out/align",
            batch_size=2, grad_accum=2, lr=3e-3, epochs=5, save_every=10, keep=2, workers=1),
    2: dict(data=[str(SAMPLE / "LLaSO-Instruct/merged/stage2_train.json")], out="out/instruct",
            projector="out/align", batch_size=1, grad_accum=4, lr=2e-3, epochs=3, save_every=10, keep=2,
            workers=1),
}

HELP = {
    "data": "corpus JSON/JSONL files or folders (folders are searched recursively)",
    "audio_root": "folder the records' audio paths are relative to",
    "encoder": "Whisper checkpoint: hub id or directory",
    "llm": "causal LM + tokenizer: hub id or directory",
    "projector": "stage-1 output directory (or its projector.safetensors) to start the projector from",
    "init": "continue fine-tuning a whole model: a stage-2 artifact or the released LLaSO-Base checkpoint "
            "(replaces --llm and --projector; --encoder gives its Whisper)",
    "out": "output directory: log.jsonl, checkpoints, the final model",
    "batch_size": "micro-batch per device",
    "grad_accum": "micro-batches per optimizer step on each device",
    "lr": "peak learning rate",
    "warmup_ratio": "warm-up steps = ceil(ratio x total steps)",
    "clip": "max global gradient norm; 0 disables clipping (as the reference's run effectively did)",
    "epochs": "passes over the data",
    "max_steps": "stop after this many optimizer steps (also the length of the LR schedule); 0 = all",
    "stop_after": "end this session after this step, schedule unchanged (for job time limits; --resume later)",
    "seed": "seed of the data order and of the fresh projector",
    "save_every": "checkpoint every this many optimizer steps (and at the end)",
    "keep": "how many of the newest checkpoints to keep",
    "resume": "continue from the newest checkpoint in --out (same batches, same losses)",
    "strict": "stop at the first unusable record instead of skipping and counting it",
    "compat_chunks": "cut long audio as the reference does (480,001-sample slices, one sample lost per full chunk)",
    "workers": "DataLoader worker processes per device",
    "fsdp": "shard the LLM per decoder layer with FSDP2 (stage 2 on small GPUs) instead of plain DDP",
    "peak_tflops": "per-GPU peak bf16 TFLOP/s for the MFU column; 0 = guess from the GPU name",
}


def parse_config(argv, stage: int, config_class=Config, doc: str = __doc__) -> Config:
    """Paper defaults <- preset tiny <- command-line flags."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["llaso", "tiny"], default="llaso",
                        help="llaso: the paper's models and recipe; tiny: tiny models on the sample corpus (CPU)")
    for f in fields(config_class):
        if f.name in HELP and (f.name not in ("projector", "init") or stage == 2):
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                parser.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
            elif f.type is list:
                parser.add_argument(flag, nargs="+", help=HELP[f.name])
            else:
                parser.add_argument(flag, type=f.type, help=HELP[f.name])
    args = vars(parser.parse_args(argv))
    cfg = config_class()
    if args.pop("preset") == "tiny":
        tiny = dict(TINY[stage], audio_root=str(SAMPLE / "audio"))
        if not (args["encoder"] and args["llm"]):
            models = M.preset("tiny")  # written once to $LLASO_CACHE
            tiny.update(encoder=models.encoder, llm=models.llm)
        for key, value in tiny.items():
            setattr(cfg, key, value)
    for key, value in args.items():
        if value is not None:
            setattr(cfg, key, value)
    if not cfg.data or not cfg.audio_root:
        parser.error("--data and --audio-root are required (or use --preset tiny)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedule (the reference's HF cosine schedule, per optimizer step)


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(ratio * total)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """LR of optimizer step `step` (0-based): linear from 0 over `warmup` steps, then half a cosine to 0.

    As in the reference, step 0 has LR 0 when there is warm-up."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# What the two stages do differently; the loop below is shared


@dataclass
class Stage:
    number: int
    trainable: Callable  # model -> the modules that train
    order: Callable  # (corpus, seed, global_batch, epoch) -> the epoch's record order
    checkpointing: bool  # activation checkpointing in the LLM's decoder layers
    save: Callable  # (model, out_dir) -> writes the final artifact


def export_aligner(model: M.LLaSO, out: Path):
    """The reference's projector file: a torch.save'd dict of bf16 tensors under its LLaVA names."""
    state = {f"model.mm_audio_aligner.projector.{k}": v.detach().to(torch.bfloat16).cpu()
             for k, v in model.projector.state_dict().items()}
    torch.save(state, out / "mm_audio_aligner.bin")


def save_stage1(model: M.LLaSO, out: Path):
    model.save(out, with_llm=False)
    export_aligner(model, out)


STAGE1 = Stage(
    number=1,
    trainable=lambda model: [model.projector],
    order=lambda corpus, seed, global_batch, epoch: D.shuffled_order(len(corpus), seed, epoch),
    checkpointing=False,
    save=save_stage1,
)


# ----------------------------------------------------------------------------------------------------------
# Throughput accounting


def llm_positions(batch) -> list[int]:
    """Sequence length each record has in the LLM: text ids plus 1500 positions per audio chunk."""
    chunks, k, lengths = batch["audio_chunks"].tolist(), 0, []
    for ids in batch["input_ids"]:
        n = int((ids == M.AUDIO_ID).sum())
        lengths.append(len(ids) - n + M.AUDIO_TOKENS_PER_CHUNK * sum(chunks[k : k + n]))
        k += n
    return lengths


def batch_flops(model: M.LLaSO, batch, train_llm: bool) -> float:
    """Model FLOPs of one micro-batch (2 per multiply-add; attention as QK^T + AV without the causal half;
    no activation recompute). Frozen encoder: forward only. LLM: forward + backward to its input (stage 1)
    or forward + full backward (stage 2). LM head only at supervised positions, as LLaSO.forward computes it."""
    enc, llm = model.encoder.config, model.llm.config
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_proj = sum(p.numel() for p in model.projector.parameters())
    n_llm = sum(p.numel() for p in model.llm.model.layers.parameters())
    head = llm.vocab_size * llm.hidden_size
    frames = M.AUDIO_TOKENS_PER_CHUNK * len(batch["mels"])
    lengths = llm_positions(batch)
    supervised = sum(int((labels != M.IGNORE).sum()) for labels in batch["labels"])
    encoder = 2 * n_enc * frames + 4 * enc.encoder_layers * enc.d_model * M.AUDIO_TOKENS_PER_CHUNK * frames
    passes = 3 if train_llm else 2
    decoder = 2 * n_llm * sum(lengths) + 4 * llm.num_hidden_layers * llm.hidden_size * sum(t * t for t in lengths)
    return encoder + 3 * 2 * n_proj * frames + passes * (decoder + 2 * head * supervised)


PEAK_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362}  # dense bf16


def peak_flops(cfg: Config) -> float:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, step, data position, RNG states of every rank, config


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*"))  # complete by construction: a checkpoint appears by rename only


def save_checkpoint(cfg, model, optimizer, names, step, sampler_state, skipped, world, rank):
    """Collective: every rank calls it. Rank 0 writes into a temporary folder and renames it into place, so a
    crash mid-save leaves the previous checkpoint as it was."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (also under FSDP)
    weights = {k: v for k, v in get_model_state_dict(model, options=full).items() if k in names}
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, (rng_states(), skipped))
    else:
        per_rank = [(rng_states(), skipped)]
    if rank == 0:
        out = Path(cfg.out)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-"))
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
        torch.save(optim, tmp / "optimizer.pt")
        torch.save({"step": step, "sampler": sampler_state, "world": world, "rng": [r for r, _ in per_rank],
                    "skipped": [s for _, ss in per_rank for s in ss]}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        final = out / f"ckpt-{step:07d}"
        if final.exists():  # re-running a step after resuming from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(out)[: -cfg.keep]:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# The training loop (both stages)


def train(cfg: Config, stage: Stage):
    # ---- distributed set-up: torchrun's environment variables, or one plain process
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in [("RANK", 0), ("LOCAL_RANK", 0),
                                                                        ("WORLD_SIZE", 1)])
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the reference
    if distributed:  # generous timeout: rank 0 may index a 12M-record corpus while the others wait
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    master = rank == 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    out = Path(cfg.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".tmp-ckpt-*"):  # left by a crash during a save
            shutil.rmtree(tmp)

    # ---- model: frozen parts in bf16 on GPU, trainable ones in fp32 (master weights; autocast computes in bf16)
    torch.manual_seed(cfg.seed)  # the fresh projector is the same on every rank
    projector = cfg.projector
    if projector and Path(projector).is_dir():
        projector = str(Path(projector) / "projector.safetensors")
    half = torch.bfloat16 if cuda else torch.float32
    llm_dtype = torch.float32 if stage.number == 2 else half
    if cfg.init:
        model = M.LLaSO.load(cfg.init, encoder=cfg.encoder, encoder_dtype=half, llm_dtype=llm_dtype)
    else:
        model = M.LLaSO.from_parts(M.ModelConfig(encoder=cfg.encoder, llm=cfg.llm), projector=projector or None,
                                   encoder_dtype=half, llm_dtype=llm_dtype)
    model.requires_grad_(False)
    for module in stage.trainable(model):
        module.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # tied embeddings appear once
    if stage.checkpointing:
        model.llm.activation_checkpointing_enable({"use_reentrant": False})
    model.to(device).train()
    model.encoder.eval()  # frozen: no dropout, no layer-drop draws from the RNG

    # ---- data: rank 0 indexes the corpus first, the others then reuse its index
    if distributed and not master:
        dist.barrier()
    corpus = D.Corpus(cfg.data)
    if distributed and master:
        dist.barrier()
    dataset = D.LLaSODataset(corpus, model.tokenizer, model.features, cfg.audio_root,
                             max_len=model.config.max_text_len, strict=cfg.strict,
                             compat_chunks=cfg.compat_chunks)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = len(corpus) // global_batch  # the incomplete last global batch is dropped on every rank
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    if total == 0:
        raise SystemExit(f"{len(corpus)} records make no full global batch of {global_batch}: lower --batch-size "
                         "or --grad-accum")
    warmup = warmup_steps(total, cfg.warmup_ratio)

    # ---- resume: weights go in before wrapping, the optimizer state after
    step, skipped, ckpt = 0, [], None
    if cfg.resume and checkpoints(out):
        ckpt = checkpoints(out)[-1]
        state = torch.load(ckpt / "state.pt", weights_only=False)
        if state["sampler"]["global_batch"] != global_batch:
            raise SystemExit(f"{ckpt} was written with a global batch of {state['sampler']['global_batch']}, this "
                             f"run has {global_batch}: resume needs the same batch size x accumulation x devices")
        missing, unexpected = model.load_state_dict(load_file(ckpt / "trainable.safetensors", device=str(device)),
                                                    strict=False)
        assert not unexpected and not set(names) & set(missing), (unexpected, missing)
        step, skipped = state["step"], state["skipped"] if master else []
        if state["world"] == world:
            set_rng_states(state["rng"][rank])

    # ---- wrap: plain DDP (all weights on every GPU), or FSDP2 sharding of every LLM decoder layer + the rest
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        kwargs = {"mp_policy": mp} if mp else {}
        for layer in model.llm.model.layers:
            fully_shard(layer, **kwargs)
        # The root is LLaSO itself: its forward looks up the (sharded) token embeddings outside llm.forward.
        fully_shard(model, ignored_params=set(model.encoder.parameters()), **kwargs)
        wrapped = model
    elif distributed:
        wrapped = DDP(model, device_ids=[local_rank] if cuda else None, gradient_as_bucket_view=True)
    else:
        wrapped = model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if ckpt:
        optim_state = torch.load(ckpt / "optimizer.pt", weights_only=False, mmap=True) if master or not distributed \
            else {}
        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=distributed))
    if master:
        print(f"stage {stage.number}: {len(corpus):,} records, global batch "
              f"{global_batch} = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x {world} devices, "
              f"{total} steps ({warmup} warm-up), {sum(p.numel() for p in params):,} trainable parameters"
              + (f", resuming after step {step} from {ckpt}" if ckpt else ""))

    # ---- log: one JSON line per optimizer step (a resumed run drops the lines after its checkpoint)
    log_path = out / "log.jsonl"
    if master:
        lines = log_path.read_text().splitlines() if ckpt and log_path.exists() else []
        log_path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))

    # ---- data position: step t of the run = step t % steps_per_epoch of epoch t // steps_per_epoch
    def micro_batches(first_step):
        for epoch in range(first_step // steps_per_epoch, cfg.epochs):
            order = stage.order(corpus, cfg.seed, global_batch, epoch)
            start = max(0, first_step - epoch * steps_per_epoch)
            sampler = D.StepSampler(order, cfg.batch_size, cfg.grad_accum, world, rank, start_step=start)
            yield from D.make_loader(dataset, sampler, cfg.workers)

    batches = micro_batches(step)
    stand_in = None  # see stand_in_batch
    peak = peak_flops(cfg) * world if cuda else 0.0
    end = min(total, cfg.stop_after) if cfg.stop_after else total
    progress = tqdm(total=end, initial=step, disable=not master, desc=f"stage {stage.number}", dynamic_ncols=True)

    while step < end:
        lr = lr_at(step, total, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        stats = torch.zeros(5, dtype=torch.float64)  # loss sum, LLM positions, FLOPs, skipped records, audio cut
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            for file, record_no, reason in batch["skipped"]:
                skipped.append((file, record_no, reason))
                tqdm.write(f"[rank {rank}] skipped {file} record {record_no}: {reason}", file=sys.stderr)
            stats[3] += len(batch["skipped"])
            for file, record_no, what in batch["cut"]:  # audio beyond 20 chunks (10 min) trains truncated
                tqdm.write(f"[rank {rank}] audio cut in {file} record {record_no}: {what}", file=sys.stderr)
            stats[4] += len(batch["cut"])
            weight = 1.0
            if not batch["input_ids"]:  # every record unusable: keep the collectives in step, add nothing
                stand_in = stand_in or stand_in_batch(model)
                batch, weight = stand_in, 0.0
            # Every LLaSO record has audio, so the projector always gets a gradient (no find_unused_parameters).
            assert all((ids == M.AUDIO_ID).any() for ids in batch["input_ids"]), "a record without <audio>"
            last = micro == cfg.grad_accum - 1
            if cfg.fsdp:
                wrapped.set_requires_gradient_sync(last)
            sync = nullcontext() if last or not isinstance(wrapped, DDP) else wrapped.no_sync()
            with sync:
                with autocast:
                    loss = wrapped(batch)  # token mean of this micro-batch
                (loss * weight / cfg.grad_accum).backward()  # mean over micro-batches; DDP averages ranks
            flops = batch_flops(model, batch, stage.number == 2) if peak else 0.0
            stats[:3] += torch.tensor([loss.item(), sum(llm_positions(batch)), flops], dtype=torch.float64) * weight
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if distributed:
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1

        record = {"step": step, "loss": stats[0].item() / (cfg.grad_accum * world), "lr": lr,
                  "grad_norm": norm.item(), "tokens_per_s": stats[1].item() / dt, "step_s": dt,
                  "skipped": int(stats[3]), "audio_cut": int(stats[4])}
        if peak:
            record["mfu"] = stats[2].item() / dt / peak
        if master:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if step % cfg.save_every == 0 or step == end:
            sampler_state = {"epoch": step // steps_per_epoch, "start_step": step % steps_per_epoch,
                             "global_batch": global_batch, "seed": cfg.seed}
            save_checkpoint(cfg, wrapped, optimizer, names, step, sampler_state, skipped, world, rank)
    progress.close()

    # ---- the final artifact (only when the schedule has run to its end)
    if step == total:
        weights = {k: v for k, v in get_model_state_dict(wrapped, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)).items() if k in names}
        if master:
            if cfg.fsdp:  # FSDP keeps only shards: put the gathered weights into an ordinary copy on the CPU
                model = M.LLaSO.load(cfg.init, encoder=cfg.encoder) if cfg.init else M.LLaSO.from_parts(model.config)
                model.load_state_dict(weights, strict=False)
            stage.save(model, out)
            print(f"wrote the stage-{stage.number} model to {out}")
    summary = [None] * world
    if distributed:
        dist.all_gather_object(summary, skipped)
    else:
        summary = [skipped]
    if master:
        all_skipped = [s for rank_skipped in summary for s in rank_skipped]
        print(f"skipped records: {len(all_skipped)}" + "".join(f"\n  {f} record {n}: {why}"
                                                               for f, n, why in all_skipped[:50]))
    if distributed:
        dist.destroy_process_group()
    return model


def stand_in_batch(model: M.LLaSO) -> dict:
    """A one-record stand-in (blank mels) for a zero-weight step when every record of a micro-batch was unusable."""
    ids, labels = M.tokenize(model.tokenizer, "Please transcribe the audio.<audio>", ".")
    return {"input_ids": [torch.tensor(ids)], "labels": [torch.tensor(labels)],
            "mels": torch.zeros(1, model.features.feature_size, 3000), "audio_chunks": torch.tensor([1])}


def main(argv=None):
    return train(parse_config(argv, stage=1), STAGE1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
