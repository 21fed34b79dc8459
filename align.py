"""Stage 1 of LLaSO (alignment): train the projector on ASR, encoder and LLM frozen. Also the training loop of
both stages: instruct.py (stage 2) imports it and passes in what differs.

Tiny run on CPU (tiny random Whisper + Llama, the bundled sample corpus, a minute or two):

    python align.py --preset tiny                                   # one process
    torchrun --standalone --nproc_per_node=2 align.py --preset tiny  # two processes, gloo

One 8-GPU node, the paper's recipe (global batch 2 x 32 x 8 = 512, lr 1e-3, one epoch):

    torchrun --standalone --nproc_per_node=8 align.py \
        --data LLaSO-Align/ --audio-root /data/llaso/audio --out out/align

Several nodes (run the same command on every node; HEAD = address of any one of them; --out on shared storage):

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=align \
        align.py --data LLaSO-Align/ --audio-root /data/llaso/audio --out /shared/out/align

Outputs in --out (README, "align.py and instruct.py"): log.jsonl, ckpt-NNNNNNN/ (the last --keep), and at the end
projector.safetensors + llaso_config.json (LLaSO.load) and mm_audio_aligner.bin (the reference's format).
"""

import argparse
import gc
import importlib
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, astuple, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as D
import model as M

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "sample"


# ----- Config: the defaults are the paper's stage-1 recipe (warm-up 0.15 %, cosine, AdamW without weight decay) -----

def knob(default, help: str, stage: int = 1, choices: tuple | None = None):
    """A Config field that is a command-line flag: default and help in one place (stage=2: instruct.py only)."""
    metadata = {"help": help, "stage": stage, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    data: list = knob([], "corpus JSON/JSONL files or folders (folders are searched recursively)")
    audio_root: str = knob("", "folder the records' audio paths are relative to")
    encoder: str = knob(M.ModelConfig.encoder, "Whisper checkpoint, hub id or directory (default: Whisper-large-v3; "
                        "with --init the artifact's own)")
    llm: str = knob(M.ModelConfig.llm, "causal LM + tokenizer, hub id or directory (default: Llama-3.2-3B-Instruct)")
    projector: str = knob("", "stage-1 output directory or projector.safetensors to start the projector from", stage=2)
    init: str = knob("", "a stage-2 artifact or LLaSO-Base to fine-tune (instead of --llm and --projector)", stage=2)
    out: str = knob("out/align", "output directory: log.jsonl, checkpoints, the final model")
    overwrite: bool = knob(False, "delete the run already in --out (log, checkpoints, model) and start afresh")
    resume: bool = knob(False, "continue --out's run from its newest checkpoint (its trajectory's settings must match)")
    batch_size: int = knob(2, "micro-batch per device")
    grad_accum: int = knob(32, "micro-batches per optimizer step on each device")
    lr: float = knob(1e-3, "peak learning rate")
    warmup_ratio: float = knob(0.0015, "warm-up steps = ceil(ratio x total steps)")
    betas: tuple = (0.9, 0.999)  # fields without help are fixed parts of the recipe, not flags
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = knob(1.0, "max global gradient norm; 0 = no clipping (as the reference's run effectively did)")
    epochs: int = knob(1, "passes over the data (unless --max-steps is given)")
    max_steps: int = knob(0, "run length (and LR schedule) in optimizer steps, repeating epochs; 0 = --epochs passes")
    stop_after: int = knob(0, "end this session after this step, schedule unchanged (job time limits; --resume)")
    seed: int = knob(42, "seed of the data order and of the fresh projector")
    save_every: int = knob(100, "checkpoint every this many optimizer steps (and at the end)")
    keep: int = knob(20, "how many of the newest checkpoints to keep")
    strict: bool = knob(False, "stop at the first unusable record instead of skipping and counting it")
    compat_chunks: bool = knob(False, "cut long audio as the reference: 480,001-sample slices, one lost per chunk")
    workers: int = knob(4, "DataLoader worker processes per device")
    index_dir: str = knob("", "corpus index folder (default: beside each corpus file if writable, else the cache)")
    fsdp: bool = knob(False, "shard the LLM per decoder layer with FSDP2 instead of plain DDP (stage 2, small GPUs)")
    peak_tflops: float = knob(0.0, "per-GPU peak bf16 TFLOP/s for the MFU column; 0 = guess from the GPU name")
    precision: str = knob("", "bf16 (autocast, fp32 master weights; CUDA's default) or fp32", choices=("bf16", "fp32"))
    tf32: bool = knob(False, "TF32 for fp32 matmuls on CUDA, as the reference's train.py turns on (its scripts: off)")
    # fewer audio tokens and the unfrozen encoder: not LLaSO, off by default (README "Fewer audio tokens")
    stack: int = knob(None, "K encoder frames per LLM position (default: the --projector/--init model's, else 1)")
    trim_audio: bool = knob(False, "encode clips at their length, not padded to 30 s (stage 2: as its starting model)")
    train_encoder: bool = knob(False, "train Whisper's encoder too (fp32 master weights; saved as encoder/)", stage=2)
    report_to: str = knob("none", "send log.jsonl lines and the config to", choices=["none", "wandb", "tensorboard"])


# The tiny preset: models that fit a CPU, the sample corpus, a few minutes. A tiny random LLM learns nothing in minutes
# at the paper's learning rates, so they are raised; a few epochs over the 40 / 136 records show a loss curve.
TINY = {
    1: dict(data=[str(SAMPLE / "LLaSO-Align/text_audio/ASR_stage1_train.json")], out="out/align",
            batch_size=2, grad_accum=2, lr=3e-3, epochs=5, save_every=10, keep=2, workers=1),
    2: dict(data=[str(SAMPLE / "LLaSO-Instruct/merged/stage2_train.json")], out="out/instruct",
            projector="out/align", batch_size=1, grad_accum=4, lr=2e-3, epochs=3, save_every=10, keep=2,
            workers=1),
}


def parse_config(argv, stage: int, config_class=Config, doc: str = __doc__) -> Config:
    """Paper defaults (config_class: a stage may change Config's defaults) <- preset tiny <- command-line flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["llaso", "tiny"], default="llaso",
                        help="llaso: the paper's models and recipe; tiny: tiny models on the sample corpus (CPU)")
    for f in fields(Config):
        if "help" not in f.metadata or f.metadata["stage"] > stage:
            continue
        kind = {bool: dict(action="store_true"), list: dict(nargs="+")}  # every bool is off by default
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=f.metadata["help"],
                            **kind.get(f.type, dict(type=f.type, choices=f.metadata["choices"])))
    given = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    tiny = dict(TINY[stage], audio_root=str(SAMPLE / "audio")) if given.pop("preset") == "tiny" else {}
    if tiny and not (given.get("encoder") and given.get("llm")) and not given.get("init"):
        models = M.preset("tiny")  # committed in sample/models/tiny
        tiny.update(encoder=models.encoder, llm=models.llm)
    cfg = config_class(**{**tiny, **given})  # a flag wins over the preset
    if cfg.init and "encoder" not in given:
        cfg.encoder = ""  # the artifact's own encoder (LLaSO.load's choice)
    if not cfg.data or not cfg.audio_root:
        parser.error("--data and --audio-root are required (or use --preset tiny)")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if cfg.report_to != "none":  # a missing tracker package ends the run before any model is loaded
        try:
            importlib.import_module(cfg.report_to)  # the package is named as the tracker
        except ImportError:
            raise SystemExit(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install "
                             f"{cfg.report_to} (or pip install -r requirements-extras.txt)") from None
    return cfg


# ----- What the two stages do differently; the loop below is shared -------------------------------------------------

@dataclass
class Stage:
    number: int
    trainable: Callable  # model -> the modules that train
    order: Callable  # (corpus, seed, global_batch, epoch) -> the epoch's record order
    checkpointing: bool  # activation checkpointing in the LLM's decoder layers
    save: Callable  # (model, out_dir) -> writes the final artifact


def export_aligner(model: M.LLaSO, out: Path):
    """The reference's projector file: a torch.save'd dict of bf16 tensors under its LLaVA names."""
    torch.save({f"model.mm_audio_aligner.projector.{k}": v.detach().to(torch.bfloat16).cpu()
                for k, v in model.projector.state_dict().items()}, out / "mm_audio_aligner.bin")


def save_stage1(model: M.LLaSO, out: Path):
    model.save(out, with_llm=False)
    if (model.config.stack, model.config.trim_audio) == (1, False):  # the reference runs only LLaSO's
        export_aligner(model, out)


STAGE1 = Stage(number=1, trainable=lambda model: [model.projector], checkpointing=False, save=save_stage1,
               order=lambda corpus, seed, global_batch, epoch: D.shuffled_order(len(corpus), seed, epoch))


# ----- Throughput accounting ----------------------------------------------------------------------------------------

def llm_positions(model: M.LLaSO, batch) -> list[int]:
    """Each record's sequence length in the LLM: text ids plus its audio chunks' positions (1500 a chunk in LLaSO)."""
    chunks, per_chunk, k, c, lengths = batch["audio_chunks"].tolist(), model.chunk_positions(batch), 0, 0, []
    for ids in batch["input_ids"]:
        n = int((ids == M.AUDIO_ID).sum())
        n_chunks = sum(chunks[k : k + n])
        lengths.append(len(ids) - n + sum(per_chunk[c : c + n_chunks]))
        k, c = k + n, c + n_chunks
    return lengths


def batch_flops(model: M.LLaSO, batch, train_llm: bool) -> float:
    """Model FLOPs of one micro-batch, as PaLM counts them (README, MFU): 2 per multiply-add, weights x positions
    (attention: 2 x width a layer, for QK^T and AV, x all T x T pairs); a part costs its forward F, + F for its
    input's gradient when a part before it trains, + F for its weights'."""
    enc, llm = model.encoder.config, model.llm.config
    train_encoder = model.encoder.conv1.weight.requires_grad  # --train-encoder

    def cost(weights: int, positions: int, trains: bool, input_grad: bool) -> int:
        return 2 * weights * positions * (1 + trains + input_grad)

    def linear(module: torch.nn.Module) -> int:  # each linear layer: one multiply-add per weight and position
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    # log-mel frames and encoder positions per chunk (3000 and 1500, or a trimmed chunk's own)
    frames = model.real_frames(batch) or [M.MEL_FRAMES_PER_CHUNK] * len(batch["mels"])
    encoded = [(f + 1) // 2 for f in frames]  # conv2 has stride 2
    encoder = (cost(model.encoder.conv1.weight.numel(), sum(frames), train_encoder, False)
               + cost(model.encoder.conv2.weight.numel(), sum(encoded), train_encoder, train_encoder)
               + cost(linear(model.encoder.layers), sum(encoded), train_encoder, train_encoder)
               + cost(2 * enc.encoder_layers * enc.d_model, sum(t * t for t in encoded), train_encoder, train_encoder))
    projected = sum(model.chunk_positions(batch))  # fewer with --stack / --trim-audio
    projector = (cost(model.projector[0].weight.numel(), projected, True, train_encoder)
                 + cost(model.projector[2].weight.numel(), projected, True, True))
    lengths = llm_positions(model, batch)
    supervised = sum(int((labels != M.IGNORE).sum()) for labels in batch["labels"])  # the LM head's (LLaSO.forward)
    width = llm.num_attention_heads * (getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads)
    decoder = (cost(linear(model.llm.model.layers), sum(lengths), train_llm, True)
               + cost(2 * llm.num_hidden_layers * width, sum(t * t for t in lengths), True, True)
               + cost(model.llm.get_output_embeddings().weight.numel(), supervised, train_llm, True))
    return encoder + projector + decoder


# Dense bf16 tensor-core TFLOP/s by the words of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM
# card, "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"): (model, variant or "" for any other, TFLOP/s), first match wins.
PEAK_TFLOPS = [("H100", "PCIE", 756), ("H100", "NVL", 835), ("H100", "", 989), ("H200", "NVL", 835),
               ("H200", "", 989), ("GH200", "", 989), ("H800", "PCIE", 756), ("H800", "", 989), ("A100", "", 312),
               ("A800", "", 312), ("L40S", "", 362)]


def gpu_peak_tflops(name: str) -> float:
    """The GPU's dense bf16 peak from its name; 0 if unknown (then no MFU column, or give --peak-tflops)."""
    words = re.split(r"[\s_-]+", name.upper())
    matches = (tflops for model, variant, tflops in PEAK_TFLOPS if model in words and (not variant or variant in words))
    return float(next(matches, 0))


def peak_flops(cfg: Config) -> float:
    return (cfg.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name())) * 1e12


# ----- Set-up: torchrun's environment variables, or one plain process -----------------------------------------------

@dataclass
class Env:
    """Where this process runs and in which number formats."""
    rank: int
    local_rank: int
    world: int
    distributed: bool
    device: torch.device
    precision: str  # "bf16" or "fp32" (--precision); bf16 on CPU too, so the tests run the GPU's policy

    master = property(lambda self: self.rank == 0)
    cuda = property(lambda self: self.device.type == "cuda")
    frozen_dtype = property(lambda self: torch.bfloat16 if self.precision == "bf16" else torch.float32)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def set_up(precision: str = "", tf32: bool = False) -> Env:
    """torchrun's environment (or one plain process), the device, the precision ("" = bf16 on CUDA, else fp32), TF32."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in [("RANK", 0), ("LOCAL_RANK", 0),
                                                                        ("WORLD_SIZE", 1)])
    cuda = torch.cuda.is_available()
    precision = precision or ("bf16" if cuda else "fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"{torch.cuda.get_device_name()} has no bf16: pass --precision fp32")
    env = Env(rank, local_rank, world, distributed="RANK" in os.environ,
              device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"), precision=precision)
    # The reference's --tf32 False turns off both (HF); its train.py turns matmul TF32 back on, as --tf32 (CUDA only)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = False
    if cuda:
        torch.cuda.set_device(env.device)
    if env.distributed:  # generous timeout: rank 0 may index a 12M-record corpus while the others wait
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return env


def gather(obj, env: Env) -> list:
    """obj of every rank, in rank order (a collective)."""
    objs = [None] * env.world if env.distributed else [obj]
    if env.distributed:
        dist.all_gather_object(objs, obj)
    return objs


# ----- --out: one run per folder ------------------------------------------------------------------------------------

RUN_FILES = ["log.jsonl", "llaso_config.json", "projector.safetensors", "mm_audio_aligner.bin", "llm", "encoder",
             "tracker.json", "tensorboard", "wandb"]


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*"))  # complete by construction: a checkpoint appears by rename only


def prepare_out(cfg: Config, env: Env) -> Path:
    """A folder that holds a run takes only --resume (continue it) or --overwrite (delete what a run writes there)."""
    out = Path(cfg.out)
    if env.master:
        earlier = checkpoints(out) + [out / name for name in RUN_FILES if (out / name).exists()]
        if earlier and not cfg.resume:
            if not cfg.overwrite:
                raise SystemExit(f"{out} holds an earlier run ({', '.join(p.name for p in earlier[:4])}): pass "
                                 "--resume to continue it, --overwrite to delete it and start anew, or another --out")
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".tmp-*"):  # left by a crash during a save
            shutil.rmtree(tmp)
    return out


# ----- Model: frozen parts in bf16 on GPU, trainable ones in fp32 (master weights; autocast computes in bf16) -------

def audio_options(cfg: Config) -> tuple[int, bool]:
    """--stack and --trim-audio: stage 2 keeps those its --init or --projector model was trained with."""
    source = cfg.init or cfg.projector
    saved = M.saved_audio_options(source) if source else None  # None: nothing recorded
    stack = cfg.stack if cfg.stack is not None else saved[0] if saved else 1
    trim = cfg.trim_audio or bool(saved and saved[1])
    if saved and (stack, trim) != saved:
        raise SystemExit(f"{source} was trained with --stack {saved[0]}{' --trim-audio' if saved[1] else ''} (its "
                         f"llaso_config.json), but this run asks for --stack {stack}{' --trim-audio' if trim else ''}. "
                         "Stage 2 takes both from the model it starts from: leave the flags out.")
    return stack, trim


def trainable_encoder(model: M.LLaSO) -> list:  # --train-encoder
    """The encoder's weights, all but the fixed sinusoidal position table (Whisper never trains it either)."""
    return [model.encoder.conv1, model.encoder.conv2, model.encoder.layers, model.encoder.layer_norm]


def load_model(cfg: Config, stage: Stage, env: Env, projector: str = "") -> M.LLaSO:
    """--init's model, or the parts with --projector's projector (else a fresh one); fp32 where it trains."""
    dtypes = dict(encoder_dtype=torch.float32 if cfg.train_encoder else env.frozen_dtype,
                  llm_dtype=torch.float32 if stage.number == 2 else env.frozen_dtype)
    if cfg.init:
        return M.LLaSO.load(cfg.init, encoder=cfg.encoder or None, **dtypes)
    if projector and Path(projector).is_dir():
        projector = str(Path(projector) / "projector.safetensors")
    try:  # e.g. a projector file of another --stack: one clear line, not a traceback
        return M.LLaSO.from_parts(M.ModelConfig(encoder=cfg.encoder, llm=cfg.llm, stack=cfg.stack,
                                                trim_audio=cfg.trim_audio), projector=projector or None, **dtypes)
    except ValueError as error:
        raise SystemExit(f"cannot build the model: {error}") from None


def build_model(cfg: Config, stage: Stage, env: Env) -> M.LLaSO:
    torch.manual_seed(cfg.seed)  # the fresh projector is the same on every rank
    model = load_model(cfg, stage, env, cfg.projector)
    model.requires_grad_(False)
    for module in stage.trainable(model) + (trainable_encoder(model) if cfg.train_encoder else []):
        module.requires_grad_(True)
    model.own_encoder |= cfg.train_encoder  # the artifact carries the trained encoder (encoder/)
    if stage.checkpointing:
        model.llm.activation_checkpointing_enable({"use_reentrant": False})
        if cfg.train_encoder:
            model.encoder.activation_checkpointing_enable({"use_reentrant": False})
    if not cfg.fsdp:  # FSDP shards the model where it was loaded, then moves the shards (wrap): no GPU holds it all
        model.to(env.device)
    model.train()
    if not cfg.train_encoder:
        model.encoder.eval()  # frozen: no dropout, no layer-drop draws from the RNG
    return model


# ----- Data: the corpus index, the run's length in steps and its LR schedule, the micro-batches of each step --------

def load_corpus(cfg: Config, env: Env) -> D.Corpus:
    """Each index is built once where it is kept, the others waiting at two barriers: rank 0 opens the corpus first,
    then each other node's first rank (rank 0's index if on shared storage, else it builds its own), then the rest."""
    turn = 0 if env.master else 1 if env.local_rank == 0 else 2
    for _ in range(turn if env.distributed else 0):
        dist.barrier()
    try:
        corpus = D.Corpus(cfg.data, cache_dir=cfg.index_dir or None)
    except D.CorpusError as error:
        raise SystemExit(f"error: {error}") from None
    for _ in range(2 - turn if env.distributed else 0):
        dist.barrier()
    return corpus


@dataclass
class Plan:
    global_batch: int  # records per optimizer step, all ranks together
    steps_per_epoch: int  # the incomplete last global batch of an epoch is dropped on every rank
    total: int  # the run's (and the LR schedule's) length: --max-steps, else --epochs passes
    warmup: int
    end: int  # where this session stops: --stop-after, else total


def plan_steps(cfg: Config, records: int, env: Env) -> Plan:
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    steps_per_epoch = records // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{records} records fill no global batch ({global_batch}): lower --batch-size or --grad-accum")
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    if total <= 0:
        raise SystemExit("the run has no steps: give --epochs or --max-steps a positive value")
    end = min(total, cfg.stop_after) if cfg.stop_after else total
    return Plan(global_batch, steps_per_epoch, total, warmup_steps(total, cfg.warmup_ratio), end)


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(ratio * total)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """LR of optimizer step `step` (0-based), the reference's HF cosine schedule: linear from 0, then half a cosine."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def micro_batches(stage: Stage, corpus, dataset, cfg: Config, plan: Plan, env: Env, first_step: int):
    """This rank's micro-batches from optimizer step `first_step` on, epoch after epoch, each in its own order."""
    for epoch in itertools.count(first_step // plan.steps_per_epoch):
        order = stage.order(corpus, cfg.seed, plan.global_batch, epoch)
        start = max(0, first_step - epoch * plan.steps_per_epoch)
        sampler = D.StepSampler(order, cfg.batch_size, cfg.grad_accum, env.world, env.rank, start_step=start)
        yield from D.make_loader(dataset, sampler, cfg.workers)


def stand_in_batch(model: M.LLaSO) -> dict:
    """A one-record stand-in (blank mels) for a zero-weight step when every record of a micro-batch was unusable."""
    ids, labels = M.tokenize(model.tokenizer, "Please transcribe the audio.<audio>", ".")
    return {"input_ids": [torch.tensor(ids)], "labels": [torch.tensor(labels)],
            "mels": torch.zeros(1, model.features.feature_size, 3000), "audio_chunks": torch.tensor([1]),
            "audio_frames": torch.tensor([3000])}  # for --trim-audio


# ----- Resume: a checkpoint continues only the run that wrote it (weights before wrapping, optimizer after) ---------

# Settings a resumed run may change, as none moves the trajectory; every other Config field and run_settings fact must
# match. grad_accum may trade against the number of ranks (the same micro-batches): not global_batch, batch_size.
MAY_CHANGE = {"workers", "save_every", "keep", "stop_after", "resume", "overwrite", "strict", "peak_tflops", "out",
              "grad_accum", "report_to", "index_dir"}


def run_settings(cfg: Config, corpus: D.Corpus, plan: Plan, env: Env) -> dict:
    """A checkpoint's config.json: the config, and the facts it implies that fix the trajectory."""
    settings = dict(asdict(cfg), global_batch=plan.global_batch, total_steps=plan.total, precision=env.precision,
                    data_records={str(file): len(index) for file, index in zip(corpus.files, corpus.indexes)})
    return json.loads(json.dumps(settings))  # as read back: tuples become lists


def safe_load(path: Path, **kwargs):
    """torch.load of tensors and plain values only: unpickling anything else could run code planted in --out."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise SystemExit(f"{path} holds objects other than tensors and plain values and is not loaded (that could "
                         f"run any code): {str(error).splitlines()[0]}") from None


def find_resume(cfg: Config, settings: dict) -> tuple[Path, dict] | None:
    """With --resume, the newest checkpoint in --out and its state (else None), refused if its settings differ."""
    ckpts = checkpoints(Path(cfg.out))
    if not (cfg.resume and ckpts):
        return None
    saved = json.loads((ckpts[-1] / "config.json").read_text())
    changed = [f"  {key}: {saved.get(key, '(not recorded)')} -> {value}" for key, value in settings.items()
               if key not in MAY_CHANGE and saved.get(key, "(not recorded)") != value]
    if changed:
        raise SystemExit(f"--resume: {ckpts[-1]} was written with other settings, and these change the training "
                         "trajectory (checkpoint -> now):\n" + "\n".join(changed) + "\nResume with the "
                         "checkpoint's settings, or start a new run (another --out, or --overwrite).")
    return ckpts[-1], safe_load(ckpts[-1] / "state.pt")


def rng_states() -> dict:
    """This process's RNG states as tensors, lists and numbers (what torch.load(weights_only=True) reads)."""
    version, mt, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [version, list(mt), gauss],
            "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    np.random.set_state(tuple(states["numpy"]))


def restore_model(model: M.LLaSO, ckpt: Path, state: dict, env: Env):
    """Trainable weights and, on as many ranks as before, this rank's RNG states."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # tied embeddings appear once
    weights = load_file(ckpt / "trainable.safetensors", device=str(next(model.parameters()).device))  # FSDP: CPU
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not set(names) & set(missing), (unexpected, missing)
    if state["world"] == env.world:
        set_rng_states(state["rng"][env.rank])


def restore_optimizer(wrapped, optimizer, ckpt: Path, env: Env):
    """AdamW's state, read on rank 0 and broadcast (each rank keeps its shard under FSDP)."""
    state = safe_load(ckpt / "optimizer.pt", mmap=True) if env.master or not env.distributed else {}
    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=env.distributed))


# ----- Wrapping: plain DDP (all weights on every GPU), or FSDP2 sharding of every LLM decoder layer + the rest ------

def wrap(model: M.LLaSO, cfg: Config, env: Env):
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16: units gathered in bf16, gradients reduce-scattered in fp32 into the fp32 shards (master weights).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if env.precision == "bf16" else {}
        for layer in [*model.llm.model.layers, *(model.encoder.layers if cfg.train_encoder else [])]:
            fully_shard(layer, **kwargs)  # a trained encoder is sharded like the LLM, per layer
        # The root is LLaSO itself: its forward looks up the (sharded) token embeddings outside llm.forward.
        frozen = None if cfg.train_encoder else set(model.encoder.parameters())
        fully_shard(model, ignored_params=frozen, **kwargs)
        if frozen:
            model.encoder.to(env.device)  # ignored by FSDP: replicated, and moved by us
        return model
    if env.distributed:
        return DDP(model, device_ids=[env.local_rank] if env.cuda else None, gradient_as_bucket_view=True)
    return model


# ----- One optimizer step -------------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """What one optimizer step measured, summed over its micro-batches (then over ranks)."""
    loss_sum: float = 0.0  # token-mean loss of each usable micro-batch
    usable: int = 0  # micro-batches with at least one usable record
    positions: int = 0  # LLM positions, for tokens/s
    flops: float = 0.0  # model FLOPs, for MFU
    skipped: int = 0  # unusable records
    audio_cut: int = 0  # records whose audio passed 20 chunks (10 min) and trains truncated

    def summed_over_ranks(self, env: Env) -> "StepStats":
        if not env.distributed:
            return self
        values = torch.tensor(astuple(self), dtype=torch.float64, device=env.device)
        dist.all_reduce(values)
        return StepStats(*(type(mine)(v) for mine, v in zip(astuple(self), values.tolist())))

    def record(self, step: int, lr: float, norm: float | None, seconds: float, peak: float) -> dict:
        """The step's line in log.jsonl. A step without a usable record has no loss and is marked "skipped_step"."""
        record = {"step": step, "loss": self.loss_sum / self.usable if self.usable else None, "lr": lr,
                  "grad_norm": norm, "tokens_per_s": self.positions / seconds, "step_s": seconds,
                  "skipped": self.skipped, "audio_cut": self.audio_cut}
        if not self.usable:
            record["skipped_step"] = True
        if peak:
            record["mfu"] = self.flops / seconds / peak
        return record


def train_step(wrapped, model, optimizer, params, batches, lr: float, skipped: list, cfg: Config, env: Env,
               flops_of: Callable | None) -> tuple[StepStats, float | None]:
    """grad_accum micro-batches forward and backward, then clipping and AdamW. The gradient is that of the mean loss
    over the usable micro-batches of all ranks; with none on any rank, no weight and no optimizer state changes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    stats = StepStats()
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        for file, record_no, reason in batch["skipped"]:
            skipped.append((file, record_no, reason))
            tqdm.write(f"[rank {env.rank}] skipped {file} record {record_no}: {reason}", file=sys.stderr)
        for file, record_no, what in batch["cut"]:
            tqdm.write(f"[rank {env.rank}] audio cut in {file} record {record_no}: {what}", file=sys.stderr)
        stats.skipped += len(batch["skipped"])
        stats.audio_cut += len(batch["cut"])
        weight = 1.0
        if not batch["input_ids"]:  # every record unusable: keep the collectives in step, add nothing
            batch, weight = stand_in_batch(model), 0.0
        # Every LLaSO record has audio, so the projector always gets a gradient (no find_unused_parameters).
        assert all((ids == M.AUDIO_ID).any() for ids in batch["input_ids"]), "a record without <audio>"
        # DDP all-reduces on the last micro-batch; FSDP reduce-scatters every one, else each rank would accumulate a
        # whole unsharded fp32 gradient of the LLM (12.9 GB) between syncs.
        sync = micro == cfg.grad_accum - 1 or not isinstance(wrapped, DDP)
        with nullcontext() if sync else wrapped.no_sync():
            with env.autocast():
                loss = wrapped(batch)  # token mean of this micro-batch
            (loss * weight / cfg.grad_accum).backward()  # mean over micro-batches; DDP averages ranks
        if weight:
            stats.loss_sum += loss.item()
            stats.usable += 1
            stats.positions += sum(llm_positions(model, batch))  # model: its positions per chunk
            stats.flops += flops_of(batch) if flops_of else 0.0
    stats = stats.summed_over_ranks(env)  # so every rank knows whether any rank had a usable record
    if stats.usable == 0:
        optimizer.zero_grad(set_to_none=True)
        return stats, None
    micro_total = cfg.grad_accum * env.world
    if stats.usable < micro_total:  # the zero-weight stand-ins are not part of the mean
        for p in params:
            p.grad.mul_(micro_total / stats.usable)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm of the shards
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, norm.item()


# ----- Log (log.jsonl, and with --report-to every line to wandb or TensorBoard), checkpoints, final artifact --------

class Tracker:
    """--out/tracker.json: the tracked run's id and last step sent, so --resume continues that run with no step twice:
    TensorBoard replaces the steps after the checkpoint (purge_step), wandb cannot, so it skips steps already sent."""

    def __init__(self, kind: str, out: Path, config: dict, master: bool, step: int):
        self.kind, self.path = (kind if master else "none"), out / "tracker.json"
        if self.kind == "none":
            return
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.kind == "wandb":
            import wandb
            self.run_id, self.last = state.get("run_id") or os.urandom(4).hex(), state.get("last_step", 0)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llaso-mini"), id=self.run_id,
                                  resume="allow", dir=out, name=out.name, config=config)
        else:
            from torch.utils.tensorboard import SummaryWriter
            self.run_id, self.last = None, step
            self.run = SummaryWriter(out / "tensorboard", purge_step=step + 1 if step else None)
            if not step:
                self.run.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"kind": self.kind, "run_id": self.run_id, "last_step": self.last}) + "\n")
        tmp.replace(self.path)

    def log(self, record: dict):
        if self.kind == "none" or record["step"] <= self.last:
            return
        values = {k: v for k, v in record.items() if k != "step"}
        if self.kind == "wandb":
            self.run.log(values, step=record["step"])
        else:
            for key, value in values.items():
                self.run.add_scalar(key, value, record["step"])
            self.run.flush()
        self.last = record["step"]
        self.save()

    def close(self):
        if self.kind == "wandb":
            self.run.finish()
        elif self.kind == "tensorboard":
            self.run.close()


class RunLog:
    """log.jsonl (a JSON line per optimizer step) and the progress bar, on rank 0. On resume it keeps the lines up to
    the checkpoint, less a last line torn by a kill, in one rename: a crash leaves the old log whole."""

    def __init__(self, out: Path, step: int, end: int, stage: int, master: bool, tracker: "Tracker"):
        self.path, self.master, self.tracker = out / "log.jsonl", master, tracker
        lines = self.path.read_text(errors="replace").splitlines() if master and step and self.path.exists() else []
        kept = []
        for n, line in enumerate(lines, 1):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except ValueError:
                if n < len(lines):
                    raise SystemExit(f"{self.path} line {n} is not JSON: fix or delete it, then --resume") from None
        if master:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        self.progress = tqdm(total=end, initial=step, disable=not master, desc=f"stage {stage}", dynamic_ncols=True)

    def write(self, record: dict):
        if not self.master:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record)
        self.progress.update(1)
        if record["loss"] is None:
            tqdm.write(f"step {record['step']}: no usable record on any rank, no update", file=sys.stderr)
        else:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")


@contextmanager
def temporary_folder(out: Path, prefix: str, what: Path, intact: str):
    """A fresh folder in `out` to write into, then to be renamed into place. A failed write removes it and ends the
    run naming `what` and what is `intact` (torch.save reports a failed write as a RuntimeError)."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=prefix))
        yield tmp
    except (OSError, RuntimeError, SafetensorError) as error:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"could not write {what}: {error}. {intact} Free some space (or fix the folder's "
                         "permissions), then rerun with --resume.") from None


def trainable_weights(model: M.LLaSO, env: Env) -> dict:
    """Collective: only the trainable weights, whole, on rank 0's CPU ({} elsewhere); under FSDP every rank gathers."""
    weights = {}
    for name, p in model.named_parameters():  # a tied weight (the LM head) appears once
        if p.requires_grad:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            if env.master:
                weights[name] = whole.detach().cpu().contiguous()
    return weights


def save_checkpoint(cfg: Config, model: M.LLaSO, wrapped, optimizer, step: int, plan: Plan, skipped: list,
                    settings: dict, env: Env):
    """Collective. Rank 0 writes into a temporary folder, then renames it: a failed save keeps the previous one."""
    weights = trainable_weights(model, env)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (also under FSDP)
    optim = get_optimizer_state_dict(wrapped, optimizer, options=full)
    per_rank = gather((rng_states(), skipped), env)
    if env.master:
        out = Path(cfg.out)
        final, previous = out / f"ckpt-{step:07d}", checkpoints(out)
        sampler = {"epoch": step // plan.steps_per_epoch, "start_step": step % plan.steps_per_epoch,
                   "global_batch": plan.global_batch, "seed": cfg.seed}
        intact = f"The previous checkpoint, {previous[-1] if previous else 'none'}, is intact."
        with temporary_folder(out, ".tmp-ckpt-", final, intact) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save({"step": step, "sampler": sampler, "world": env.world, "rng": [r for r, _ in per_rank],
                        "skipped": [list(s) for _, ss in per_rank for s in ss]}, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
        if final.exists():  # re-running a step after resuming from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(out)[: -cfg.keep]:
            shutil.rmtree(old)
    if env.distributed:
        dist.barrier()


def save_final(cfg: Config, stage: Stage, model: M.LLaSO, env: Env):
    """Collective: the stage's model in --out, written into a temporary folder, then moved in. llaso_config.json,
    which LLaSO.load reads first, goes first and comes back last: a crash leaves no half-replaced model that loads."""
    if cfg.fsdp:  # FSDP keeps only shards: rank 0 puts the gathered trainable weights into a copy on the CPU
        weights = trainable_weights(model, env)
        if env.master:
            own_encoder, model = model.own_encoder, load_model(cfg, stage, env)  # fresh projector: replaced next
            model.load_state_dict(weights, strict=False)
            model.own_encoder = own_encoder
    if not env.master:
        return
    out = Path(cfg.out)
    with temporary_folder(out, ".tmp-model-", out, "The checkpoints are intact.") as tmp:
        stage.save(model, tmp)
    (out / "llaso_config.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "llaso_config.json"):
        if (out / entry.name).is_dir():
            shutil.rmtree(out / entry.name)
        os.replace(entry, out / entry.name)
    tmp.rmdir()
    print(f"wrote the stage-{stage.number} model to {out}")


# ----- The training run (both stages) -------------------------------------------------------------------------------

def train(cfg: Config, stage: Stage):
    env = set_up(cfg.precision, cfg.tf32)
    out = prepare_out(cfg, env)
    corpus = load_corpus(cfg, env)
    plan = plan_steps(cfg, len(corpus), env)
    cfg.stack, cfg.trim_audio = audio_options(cfg)  # resolved first: --resume compares what runs
    settings = run_settings(cfg, corpus, plan, env)
    resume = find_resume(cfg, settings)  # None: a fresh run

    model = build_model(cfg, stage, env)
    if resume:
        restore_model(model, *resume, env)
    dataset = D.LLaSODataset(corpus, model.tokenizer, model.features, cfg.audio_root, strict=cfg.strict,
                             max_len=model.config.max_text_len, compat_chunks=cfg.compat_chunks)
    wrapped = wrap(model, cfg, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if resume:
        restore_optimizer(wrapped, optimizer, resume[0], env)
    step = resume[1]["step"] if resume else 0
    skipped = [tuple(s) for s in resume[1]["skipped"]] if resume and env.master else []  # listed once, by rank 0
    if env.master:
        print(f"stage {stage.number}: {len(corpus):,} records, global batch {plan.global_batch} = "
              f"{cfg.batch_size} per device x {cfg.grad_accum} accumulation x {env.world} devices, {plan.total} "
              f"steps ({plan.warmup} warm-up), {sum(p.numel() for p in params):,} trainable parameters"
              + (f", resuming after step {step} from {resume[0]}" if resume else ""))

    tracker = Tracker(cfg.report_to, out, settings, env.master, step)
    log = RunLog(out, step, plan.end, stage.number, env.master, tracker)
    batches = micro_batches(stage, corpus, dataset, cfg, plan, env, first_step=step)
    peak = peak_flops(cfg) * env.world if env.cuda else 0.0
    flops_of = (lambda batch: batch_flops(model, batch, train_llm=stage.number == 2)) if peak else None
    with log.progress:  # closes the progress bar also when an error ends the run
        while step < plan.end:
            lr = lr_at(step, plan.total, plan.warmup, cfg.lr)
            t0 = time.time()
            stats, norm = train_step(wrapped, model, optimizer, params, batches, lr, skipped, cfg, env, flops_of)
            if env.cuda:
                torch.cuda.synchronize()
            step += 1
            log.write(stats.record(step, lr, norm, time.time() - t0, peak))
            if step % cfg.save_every == 0 or step == plan.end:
                save_checkpoint(cfg, model, wrapped, optimizer, step, plan, skipped, settings, env)
    tracker.close()

    if step == plan.total:  # only when the schedule has run to its end
        save_final(cfg, stage, model, env)
    skipped = [s for rank_skipped in gather(skipped, env) for s in rank_skipped]  # all ranks'
    if env.master:
        print(f"skipped records: {len(skipped)}" + "".join(f"\n  {f} record {n}: {why}" for f, n, why in skipped[:50]))
    if env.distributed:
        # DDP's reducer holds the process group. Freed after destroy_process_group, it would tear the group down
        # holding the GIL, which gloo's threads may still need to free a finished collective's tensors: a deadlock.
        del wrapped
        gc.collect()  # DDP sits in reference cycles: free it now, not at some later collection
        dist.destroy_process_group()
    return model


def main(argv=None):
    if "--train-encoder" in (sys.argv[1:] if argv is None else argv):
        raise SystemExit("--train-encoder is a stage-2 option (instruct.py): stage 1 trains only the projector")
    return train(parse_config(argv, stage=1), STAGE1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
