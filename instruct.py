"""Stage 2 of LLaSO (instruction tuning): projector + the whole LLM train (incl. the tied embedding rows of the
five new tokens), encoder frozen, activation checkpointing on, modality/length-grouped batches. The loop is
align.py's; this file says what differs. The final model (projector.safetensors, llm/, llaso_config.json) loads with
LLaSO.load(out) and evaluate.py. Not LLaSO (README "Fewer audio tokens and the unfrozen encoder"): --train-encoder
trains the encoder too (the paper's ablation); --stack and --trim-audio come from the --projector/--init model.

Tiny run on CPU (after `align.py --preset tiny`; starts from out/align):

    python instruct.py --preset tiny
    torchrun --standalone --nproc_per_node=2 instruct.py --preset tiny

One 8-GPU node (80 GB GPUs; global batch 1 x 32 x 8 = 256, lr 3e-5, one epoch):

    torchrun --standalone --nproc_per_node=8 instruct.py --projector out/align \
        --data LLaSO-Instruct/merged.json --audio-root /data/llaso/audio --out out/instruct

Several nodes, or GPUs under 80 GB: the same with FSDP2 (--fsdp shards weights, gradients and Adam state):

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=instruct \
        instruct.py --fsdp --projector /shared/out/align --data ... --audio-root ... --out /shared/out/instruct

Continue fine-tuning the released model (or any stage-2 artifact) on your data:

    torchrun --standalone --nproc_per_node=8 instruct.py --init LLaSO-Base-3.8B-Instruct \
        --encoder openai/whisper-large-v3 --data my_data.json --audio-root /data/mine --out out/finetune
"""

import os
from dataclasses import dataclass

import align
import data as D


@dataclass
class InstructConfig(align.Config):
    """The paper's stage-2 recipe: micro-batch 1 x 32 accumulation x 8 GPUs = 256, lr 3e-5, 1 % warm-up."""
    out: str = "out/instruct"
    batch_size: int = 1
    lr: float = 3e-5
    warmup_ratio: float = 0.01
    save_every: int = 500
    keep: int = 50


STAGE2 = align.Stage(
    number=2,
    trainable=lambda model: [model.projector, model.llm],
    # each optimizer step holds records of near-equal text length; the steps come in random order
    order=lambda corpus, seed, global_batch, epoch: D.grouped_order(corpus.lengths(), global_batch, seed, epoch),
    checkpointing=True,
    save=lambda model, out: model.save(out, with_llm=True),
)


def main(argv=None):
    cfg = align.parse_config(argv, stage=2, config_class=InstructConfig, doc=__doc__)
    if not (cfg.projector or cfg.init):
        raise SystemExit("--projector (the stage-1 output directory, align.py --out) or --init is required")
    return align.train(cfg, STAGE2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
