"""The random models of two presets, kept apart from the model's code (model.preset finds them):

- tiny: a tiny random Whisper + Llama and a 512-entry tokenizer, committed in sample/models/tiny (1.7 MB), so the
  quick start and the tests load them from disk through the same from_pretrained path as real checkpoints;
- llaso-random: Whisper-large-v3's encoder and Llama-3.2-3B-Instruct's architectures with random weights, for
  benchmarks (the real shapes, memory and speed, offline); written to the cache folder on first use (7.7 GB).

    python sample/make_models.py                  # rewrite sample/models/tiny (a test checks it is this output)
    python sample/make_models.py --out /tmp/tiny  # write it elsewhere
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

RANDOM_VERSION = 1  # bump when build_random changes: a stale cached llaso-random is rebuilt

# The architectures of openai/whisper-large-v3 and meta-llama/Llama-3.2-3B-Instruct, as their config.json give
# them, so that llaso-random has the real shapes without a download.
WHISPER_LARGE_V3 = dict(
    num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
    decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866, max_source_positions=1500,
    max_target_positions=448, activation_function="gelu", scale_embedding=False, pad_token_id=50256,
    bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
)
LLAMA_32_3B_INSTRUCT = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
)


def write_once(folder: Path, write, note: str) -> Path:
    """write(tmp) into a temporary sibling of `folder`, then rename it to `folder`; later calls reuse it."""
    if (folder / "done").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    write(tmp)
    (tmp / "done").write_text(note + "\n")
    try:
        tmp.rename(folder)  # atomic: a concurrent builder either wins or finds the finished folder
    except OSError:
        shutil.rmtree(tmp)
    return folder


def random_parts():
    """llaso-random's (Whisper config, LLM config, tokenizer): everything but the weights."""
    return WhisperConfig(**WHISPER_LARGE_V3), LlamaConfig(**LLAMA_32_3B_INSTRUCT), build_tokenizer(llama3_ids=True)


def build_random(folder: Path) -> Path:
    """Whisper-large-v3's encoder and Llama-3.2-3B-Instruct with transformers' random init, in bf16 as released, and
    the Llama-3-sized tokenizer, written once into `folder` (7.7 GB; later calls reuse it)."""

    def write(tmp: Path):
        torch.manual_seed(0)
        encoder_config, llm_config, tokenizer = random_parts()
        encoder = WhisperEncoder(encoder_config).to(torch.bfloat16)
        M.save_encoder(encoder, WhisperFeatureExtractor(feature_size=encoder_config.num_mel_bins), tmp / "encoder")
        del encoder
        AutoModelForCausalLM.from_config(llm_config, dtype=torch.bfloat16).save_pretrained(tmp / "llm")
        tokenizer.save_pretrained(tmp / "llm")

    return write_once(folder, write, "seed 0")


# A few hundred words of the prompt format and typical instructions train the tiny tokenizer's merges.
TINY_TEXT = [
    M.SYSTEM_PROMPT,
    "Please transcribe the audio. Transcribe the speech into text. What is the gender of the speaker?",
    "Male. Female. Listen to this audio carefully and share your answer. Which accent does the speaker have?",
    "American, British, Scottish, Caribbean. Turn off the kitchen lights. Set an alarm for seven in the morning.",
    "What is the capital of France? Paris. The quick brown fox jumps over the lazy dog. Answer the question.",
]
LLAMA3_SPLIT = (  # Llama-3's pre-tokenizer pattern, so prompts split into pieces the way the real one does
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Llama-3's chat special tokens at their ids (its 256 special tokens take 128,000-128,255, reserved ones in the
# gaps); the tiny tokenizer has them first (ids 0-7), in this order.
LLAMA3_CONTROL_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                      "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                      "<|finetune_right_pad_id|>": 128004}


def build_tokenizer(llama3_ids: bool = False):
    """The tiny tokenizer, offline: a byte-level BPE with Llama-3's pre-tokenizer, 512 entries trained on TINY_TEXT;
    as Llama-3's, it prepends <|begin_of_text|> and <|eot_id|> ends a turn. llama3_ids (llaso-random): the same merges
    padded with placeholders to 128,000 ids, then Llama-3's 256 special tokens, so all ids are Llama-3's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[] if llama3_ids else list(LLAMA3_CONTROL_IDS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TEXT, trainer)
    if llama3_ids:
        state = json.loads(tok.to_str())
        vocab = state["model"]["vocab"]
        vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 128000)})
        tok = Tokenizer.from_str(json.dumps(state))
        reserved = iter(f"<|reserved_special_token_{k}|>" for k in range(256))
        by_id = {i: t for t, i in LLAMA3_CONTROL_IDS.items()}
        tok.add_special_tokens([AddedToken(by_id.get(i) or next(reserved), special=True, normalized=False)
                                for i in range(128000, 128256)])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")


def write_tiny(folder: Path):
    """A tiny random Whisper (large-v3's interface: 128 mels, 3000 frames in, 1500 positions out) and Llama, with the
    tiny tokenizer. With transformers' std-0.02 init a tiny encoder's output barely depends on its input (the fixed
    sinusoidal positions dominate) and nothing could learn from audio: it gets PyTorch's default init, convs x10."""
    torch.manual_seed(0)
    whisper_config = WhisperConfig(
        num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=256, vocab_size=128,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    whisper = WhisperForConditionalGeneration(whisper_config)
    encoder = whisper.model.encoder
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.reset_parameters()
        encoder.conv1.weight.mul_(10)
        encoder.conv2.weight.mul_(10)
    whisper.save_pretrained(folder / "encoder")
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder / "encoder")

    tokenizer = build_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(llama_config).save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=M.TINY, help=f"where the tiny models go (default {M.TINY})")
    out = parser.parse_args(argv).out
    shutil.rmtree(out, ignore_errors=True)
    write_tiny(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
