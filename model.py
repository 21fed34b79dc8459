"""The LLaSO model: frozen Whisper encoder -> MLP projector -> Llama, and the prompt format (README, model.py).

    wav -> log-mel chunks [n, 128, 3000] -> Whisper encoder [n, 1500, 1280] -> projector [n, 1500, 3072]
        -> the chunks replace each <audio> placeholder in the Llama-3 chat prompt -> Llama-3.2-3B-Instruct

Options beyond LLaSO, off by default (ModelConfig.stack, .trim_audio): K encoder frames side by side per LLM
position (1500/K per chunk), and encoding only a clip's real length instead of 30 s of padding.

    python model.py --preset llaso-random             # parameters of each part, counted on the meta device
    python model.py --convert LLaSO-Base-3.8B-Instruct --out ckpt/llaso-base --encoder openai/whisper-large-v3
"""

import argparse
import functools
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache,
                          WhisperConfig, WhisperFeatureExtractor)
from transformers.models.whisper.modeling_whisper import WhisperEncoder


# ----- Prompt format (template llama32_audio_v1_mmtag of the reference, byte-exact) ---------------------------------

# The missing space in "language.The" is in the reference and in the released model's training data.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to "
    "understand the audio content that the user provides, and assist the user with a variety of tasks using "
    "natural language.The audio content will be provided with the following format: <Audio>audio content</Audio>."
)
AUDIO = "<audio>"  # placeholder in a human turn; never a vocabulary token
AUDIO_ID = -300  # its sentinel id in token-id lists, replaced by 1500 audio embeddings per 30 s chunk
IGNORE = -100  # label of every position that is not supervised
NEW_TOKENS = ["<unk>", "<Audio>", "</Audio>", "<audio_start>", "<audio_end>"]  # added in this order
EOS_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]  # generation stops on any of them
MEL_FRAMES_PER_CHUNK = 3000  # 30 s of log-mel at a 10 ms hop: the window Whisper was trained on


def wrap_audio(human: str) -> str:
    """Wrap every <audio> in the mmtag markers; the newlines depend on whether text comes before the audio."""
    human = human.strip()
    if human.split(AUDIO, 1)[0].strip():  # instruction first: (t,a) and (a)
        wrapped = f"\n<Audio><audio_start>{AUDIO}<audio_end></Audio>\n\n"
    else:  # audio first: (a,t)
        wrapped = f"<Audio><audio_start>{AUDIO}<audio_end></Audio>\n"
    return human.replace(AUDIO, wrapped)


def prompt_text(human: str, answer: str | None = None) -> str:
    """The exact training string; with answer=None it stops after the assistant header (generation prompt)."""
    text = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{wrap_audio(human)}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    return text if answer is None else text + answer.strip() + "<|eot_id|>"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt string, one AUDIO_ID per <audio> (the pieces around it are tokenised apart)."""
    ids = []
    for piece in text.split(AUDIO):
        ids += tokenizer.encode(piece, add_special_tokens=False) + [AUDIO_ID]
    return ids[:-1]


def tokenize(tokenizer, human: str, answer: str | None = None, max_len: int = 2048):
    """(input_ids, labels) of one record; only the answer and its <|eot_id|> are supervised. max_len caps text ids
    (a placeholder counts as one) before audio is spliced in, as the reference does."""
    prompt = encode(tokenizer, prompt_text(human))
    if answer is None:
        ids, labels = prompt, [IGNORE] * len(prompt)
    else:
        ids = encode(tokenizer, prompt_text(human, answer))
        if ids[: len(prompt)] != prompt:  # holds for Llama-3: the header ends in "\n\n", a pre-token boundary
            raise ValueError("prompt tokens are not a prefix of the full tokenisation")
        labels = [IGNORE] * len(prompt) + ids[len(prompt) :]
    if ids[:max_len].count(AUDIO_ID) != ids.count(AUDIO_ID):
        raise ValueError(f"text longer than {max_len} tokens cuts off an <audio> placeholder")
    return ids[:max_len], labels[:max_len]


# ----- Loading weights from a transformers checkpoint (a hub id or a local directory) -------------------------------

# The weights transformers' from_pretrained reads: one file, or shards named by the index. Other *.safetensors are
# variants (openai/whisper-large-v3 also ships fp32 shards, 6 GB, beside its fp16 model.safetensors): never fetched.
WEIGHT_FILES = ["model.safetensors", "model-*-of-*.safetensors"]


def resolve(name_or_dir: str, weights: bool = True) -> Path:
    """A local directory as is; a hub id through the hub cache (configs, and the weights if `weights`)."""
    if Path(name_or_dir).is_dir():
        return Path(name_or_dir)
    return Path(snapshot_download(name_or_dir, allow_patterns=["*.json"] + WEIGHT_FILES * weights))


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")
    return [folder / "model.safetensors"]


def load_prefixed(module: nn.Module, folder: Path, prefix: str, dtype=None):
    """Load the tensors named `prefix + key` into `module`, strictly, one shard at a time."""
    state = {}
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key).to(dtype)
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{folder}: weights under '{prefix}' do not fit: missing {missing[:10]}, extra {extra[:10]}")
    module.load_state_dict(state, assign=True)
    return module


# ----- Encoder: Whisper's encoder only, frozen, no autograd (instruct.py --train-encoder trains it: not LLaSO) ------

def load_encoder(name_or_dir: str, dtype=torch.float32, weights_from: tuple[Path, str] | None = None):
    """The encoder half of a Whisper checkpoint (the decoder is never loaded) and its feature extractor;
    weights_from=(folder, prefix) takes the weights from another checkpoint (the released LLaSO model)."""
    folder = resolve(name_or_dir, weights=weights_from is None)
    config = WhisperConfig.from_pretrained(folder)
    with torch.device("meta"):  # weights come from the checkpoint; skip the random init
        encoder = WhisperEncoder(config)
    load_prefixed(encoder, *(weights_from or (folder, "model.encoder.")), dtype)
    encoder.requires_grad_(False).eval()
    if (folder / "preprocessor_config.json").exists():
        features = WhisperFeatureExtractor.from_pretrained(folder)
    else:
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return encoder, features


def save_encoder(encoder, features, folder: Path):
    """A Whisper-format folder with the encoder only (tensors under model.encoder.), as load_encoder reads it."""
    encoder.config.save_pretrained(folder)  # creates the folder
    features.save_pretrained(folder)
    save_file({"model.encoder." + k: v.contiguous() for k, v in encoder.state_dict().items()},
              folder / "model.safetensors")


def whisper_forward(encoder: WhisperEncoder, mels: torch.Tensor) -> torch.Tensor:
    """WhisperEncoder's forward on up to 3000 log-mel frames, [n, n_mels, F] -> [n, ceil(F/2), d], its positions cut
    to the input's length (transformers' refuses all but 3000); on 3000 frames it equals transformers' (tested)."""
    if encoder.training and encoder.layerdrop > 0:
        raise ValueError("this Whisper config sets encoder_layerdrop, which the trimmed-audio forward does not apply")
    hidden = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mels)))).transpose(1, 2)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    hidden = F.dropout(hidden, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


def audio_positions(mel_frames: int, stack: int = 1) -> int:
    """LLM positions of one chunk: conv2 (stride 2) halves its frames, stacking K frames divides by K (ceil)."""
    return -(-((mel_frames + 1) // 2) // stack)


def stack_frames(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """[n, T, d] -> [n, ceil(T/k), k*d]: k consecutive frames side by side, the last group padded with zeros."""
    if k == 1:
        return hidden
    return F.pad(hidden, (0, 0, 0, -hidden.shape[1] % k)).reshape(len(hidden), -1, k * hidden.shape[2])


# ----- Projector: mlp2x_gelu, frame-wise, PyTorch default init (it is created after the LLM, so no HF init) ---------

def make_projector(d_encoder: int, d_llm: int, stack: int = 1) -> nn.Sequential:
    """stack > 1 (not LLaSO): each position is `stack` encoder frames side by side, so the input is stack x wider."""
    return nn.Sequential(nn.Linear(d_encoder * stack, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))


# ----- LLM and tokenizer, with the five special tokens of LLaSO -----------------------------------------------------

def add_audio_tokens(llm, tokenizer):
    """Add NEW_TOKENS (pad = <unk>) and give each new embedding row the mean of the original rows."""
    missing = [t for t in NEW_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token = "<unk>"
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:  # a saved stage-2 or released model already has the rows: keep them
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {llm.get_input_embeddings(), llm.get_output_embeddings()}:  # one matrix when tied
                emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)


def load_llm(name_or_dir: str, dtype=torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    llm = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, attn_implementation="sdpa")
    add_audio_tokens(llm, tokenizer)
    return llm, tokenizer


# ----- The model ----------------------------------------------------------------------------------------------------

def left_padded(caches: list[torch.Tensor]) -> torch.Tensor:
    """One layer's keys (or values) of each prompt, [heads, n_i, d] -> [rows, heads, max n_i, d], zeros on the left."""
    rows = [c.transpose(0, 1) for c in caches]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_side="left").transpose(1, 2)


@dataclass
class ModelConfig:
    encoder: str = "openai/whisper-large-v3"  # hub id or directory of a Whisper checkpoint
    llm: str = "meta-llama/Llama-3.2-3B-Instruct"  # hub id or directory of a causal LM (+ tokenizer)
    max_text_len: int = 2048  # text ids per record before splicing (reference: model_max_length)
    stack: int = 1  # encoder frames concatenated per LLM position (LLaSO: 1, i.e. 1500 positions per 30 s chunk)
    trim_audio: bool = False  # encode each chunk's real length instead of 30 s of padding (LLaSO: False)

    def __post_init__(self):
        if self.stack < 1:
            raise ValueError(f"stack must be at least 1 (got {self.stack})")


class LLaSO(nn.Module):
    def __init__(self, config: ModelConfig, encoder, features, projector, llm, tokenizer):
        super().__init__()
        self.config, self.features, self.tokenizer = config, features, tokenizer
        self.encoder, self.projector, self.llm = encoder, projector, llm
        self.eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS if t in tokenizer.get_vocab()]
        self.own_encoder = False  # encoder weights that config.encoder does not hold: save() must write them

    @classmethod
    def from_parts(cls, config: ModelConfig, projector: str | None = None, encoder_dtype=torch.float32,
                   llm_dtype=torch.float32):
        """From config.encoder, config.llm and a projector file (none: drawn from the current torch seed)."""
        encoder, features = load_encoder(config.encoder, encoder_dtype)
        llm, tokenizer = load_llm(config.llm, llm_dtype)
        proj = make_projector(encoder.config.d_model, llm.config.hidden_size, config.stack)
        if projector:
            state = load_file(projector)
            inputs, d = state["0.weight"].shape[1], encoder.config.d_model
            if inputs != proj[0].in_features:
                raise ValueError(f"{projector} takes {inputs} inputs per position ({inputs / d:g} stacked {d}-wide "
                                 f"encoder frames); this model stacks {config.stack} (--stack {inputs // d} fits it)")
            proj.load_state_dict(state)
        return cls(config, encoder, features, proj, llm, tokenizer)

    # ---- audio
    def encode_audio(self, mels: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """[n_chunks, n_mels, 3000] -> [n_chunks, 1500 / stack, d_llm]; all chunks of a batch in one encoder call.
        With frames (trim_audio) each chunk's first frames[i] are encoded and projected alone, so not even the batch's
        size reaches it (other shapes may pick kernels that differ in the last bits), then padded to the longest."""
        if len(mels) == 0:  # a batch of text-only prompts
            return self.projector[0].weight.new_zeros(0, audio_positions(MEL_FRAMES_PER_CHUNK, self.config.stack),
                                                      self.llm.config.hidden_size)
        if frames is not None:
            one_by_one = [self.encode_audio(chunk[None, :, :n])[0] for chunk, n in zip(mels, frames)]
            return nn.utils.rnn.pad_sequence(one_by_one, batch_first=True)
        train_encoder = self.encoder.conv1.weight.requires_grad  # --train-encoder; LLaSO's encoder is frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            mels = mels.to(next(self.encoder.parameters()).dtype)
            if mels.shape[-1] == MEL_FRAMES_PER_CHUNK:
                hidden = self.encoder(mels).last_hidden_state  # after the final LayerNorm, no pooling
            else:  # a trimmed chunk, which transformers' forward refuses
                hidden = whisper_forward(self.encoder, mels)
        return self.projector(stack_frames(hidden.to(self.projector[0].weight.dtype), self.config.stack))

    def real_frames(self, batch) -> list[int] | None:
        """With trim_audio: each chunk's log-mel frames that hold audio (the batch's "audio_frames"); else None."""
        if not self.config.trim_audio:
            return None
        if "audio_frames" not in batch:
            raise ValueError("this model encodes audio at its real length (trim_audio), so the batch needs "
                             "\"audio_frames\", each chunk's real log-mel frames (data.collate provides them)")
        return batch["audio_frames"].tolist()

    def chunk_positions(self, batch) -> list[int]:
        """LLM positions of each audio chunk of the batch: 1500 in LLaSO; 1500/K with stack K; fewer if trimmed."""
        frames = self.real_frames(batch) or [MEL_FRAMES_PER_CHUNK] * len(batch["mels"])
        return [audio_positions(f, self.config.stack) for f in frames]

    # ---- splice
    def splice(self, batch, audio: torch.Tensor, left_pad: bool = False):
        """Replace every AUDIO_ID by its file's projected chunks and pad the batch: inputs_embeds [B, T, d],
        attention_mask, labels, position_ids [B, T]; audio and padding get label IGNORE, padding zero embeddings."""
        embed = self.llm.get_input_embeddings()
        device = embed.weight.device
        sizes = self.chunk_positions(batch)  # a trimmed chunk's padding (see encode_audio) is left out here
        flat = torch.cat([chunk[:n] for chunk, n in zip(audio, sizes)]) if len(audio) else audio.flatten(0, 1)
        bounds = [0] + batch["audio_chunks"].cumsum(0).tolist()  # each file's chunks
        slots = list(flat.split([sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]))
        rows, row_labels = [], []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            ids, labels = ids.to(device), labels.to(device)
            text = embed(ids.clamp(min=0))  # sentinel rows are computed, then dropped
            pieces, piece_labels, start = [], [], 0
            for pos in (ids == AUDIO_ID).nonzero().flatten().tolist():
                slot = slots.pop(0)
                pieces += [text[start:pos], slot.to(text.dtype)]
                piece_labels += [labels[start:pos], labels.new_full((len(slot),), IGNORE)]
                start = pos + 1
            rows.append(torch.cat(pieces + [text[start:]]))
            row_labels.append(torch.cat(piece_labels + [labels[start:]]))
        if slots:
            raise ValueError(f"{len(slots)} audio files left over: fewer <audio> placeholders than audio files")
        side = "left" if left_pad else "right"
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_side=side)
        labels = nn.utils.rnn.pad_sequence(row_labels, batch_first=True, padding_value=IGNORE, padding_side=side)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        arange = torch.arange(embeds.shape[1], device=device)
        if left_pad:
            start = embeds.shape[1] - lengths[:, None]
            attention, positions = arange >= start, (arange - start).clamp(min=0)
        else:
            attention, positions = arange < lengths[:, None], arange.expand(len(rows), -1)
        return embeds, attention.long(), labels, positions

    # ---- training loss
    def forward(self, batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised tokens of the batch (fp32 logits)."""
        audio = self.encode_audio(batch["mels"].to(self.projector[0].weight.device), self.real_frames(batch))
        embeds, attention, labels, positions = self.splice(batch, audio)
        targets = labels[:, 1:]
        # LM-head logits only where some row is supervised: same loss, no [B, T, 128k] logits tensor.
        keep = (targets != IGNORE).any(0).nonzero().flatten()
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                          logits_to_keep=keep).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)

    # ---- generation
    @torch.no_grad()
    def generate_ids(self, batch, max_new_tokens: int = 256) -> list[list[int]]:
        """Batched greedy decoding, each row stopping at its own end-of-turn token and then leaving the batch. Each
        prompt is prefilled alone (the batch-1 computation; without a padding mask attention also takes its causal
        fast path, ~3x faster on CPU), the caches are left-padded into one, and position ids skip the pads."""
        audio = self.encode_audio(batch["mels"].to(self.projector[0].weight.device), self.real_frames(batch))
        embeds, attention, _, positions = self.splice(batch, audio, left_pad=True)
        width, lengths = embeds.shape[1], attention.sum(1).tolist()
        rows = [self.llm(inputs_embeds=row[None, width - n :], use_cache=True, logits_to_keep=1)
                for row, n in zip(embeds, lengths)]
        # Room for the answers: a step writes its column in place, where a growing DynamicCache copies the whole
        # cache (README, model.py: Generation). Columns not yet written are masked.
        cache = StaticCache(self.llm.config, max_cache_len=width + max_new_tokens)
        for i, layers in enumerate(zip(*(r.past_key_values.layers for r in rows))):
            cache.update(left_padded([layer.keys[0] for layer in layers]),
                         left_padded([layer.values[0] for layer in layers]), i)
        logits = torch.cat([r.logits[:, -1] for r in rows])
        del rows
        attention = torch.cat([attention, attention.new_zeros(len(embeds), max_new_tokens)], 1)
        eos = torch.tensor(self.eos_ids, device=embeds.device)
        tokens, alive = [[] for _ in embeds], list(range(len(embeds)))  # alive: batch row -> record
        for step in range(max_new_tokens):
            next_token = logits.argmax(-1)
            for record, token in zip(alive, next_token.tolist()):
                tokens[record].append(token)
            ended = torch.isin(next_token, eos)
            if ended.all() or step == max_new_tokens - 1:
                break
            if ended.any():  # finished rows leave, so the others' steps get cheaper
                keep = (~ended).nonzero().flatten()
                alive = [alive[i] for i in keep.tolist()]
                next_token, attention, positions = next_token[keep], attention[keep], positions[keep]
                cache.reorder_cache(keep)  # keeps these rows, in this order
            attention[:, width + step] = 1  # the column this step writes
            positions = positions[:, -1:] + 1
            logits = self.llm(input_ids=next_token[:, None], attention_mask=attention, position_ids=positions,
                              past_key_values=cache, use_cache=True).logits[:, -1]
        return [row[:-1] if row and row[-1] in self.eos_ids else row for row in tokens]

    def generate(self, batch, max_new_tokens: int = 256) -> list[str]:
        """Answers as text: new tokens only, special tokens skipped, stripped (as the reference does)."""
        ids = self.generate_ids(batch, max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    # ---- checkpoints
    def save(self, out_dir: str | Path, with_llm: bool):
        """Stage 1: projector + config; stage 2 (with_llm): also the LLM and tokenizer. An encoder whose weights are
        not config.encoder's (the released model's, a trained one) is written too, as a Whisper-format folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in self.projector.state_dict().items()},
                  out / "projector.safetensors")
        config = asdict(self.config)
        if with_llm:
            self.llm.save_pretrained(out / "llm")
            self.tokenizer.save_pretrained(out / "llm")
            config["llm"] = "llm"  # relative to the artifact directory
        if self.own_encoder:
            save_encoder(self.encoder, self.features, out / "encoder")
            config["encoder"] = "encoder"
        config["stage"] = 2 if with_llm else 1
        (out / "llaso_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, ckpt_dir: str | Path, encoder: str | None = None, encoder_dtype=torch.float32,
             llm_dtype=torch.float32):
        """A stage-1 or stage-2 artifact, or the released LLaSO-Base checkpoint (its LLaVA layout); `encoder`
        overrides the one the artifact's config names."""
        ckpt = Path(ckpt_dir)
        if is_llava_checkpoint(ckpt):
            return load_llava(ckpt, encoder, encoder_dtype, llm_dtype)
        saved = json.loads((ckpt / "llaso_config.json").read_text())
        stage = saved.pop("stage")
        config = ModelConfig(**saved)
        inside = lambda name: str(ckpt / name) if (ckpt / name).is_dir() and not Path(name).is_absolute() else name
        config.encoder = encoder or inside(config.encoder)
        config.llm = inside(config.llm) if stage == 2 else config.llm
        model = cls.from_parts(config, str(ckpt / "projector.safetensors"), encoder_dtype, llm_dtype)
        model.own_encoder = not encoder and Path(config.encoder) == ckpt / "encoder"
        return model


def saved_audio_options(path: str | Path) -> tuple[int, bool] | None:
    """(stack, trim_audio) from an artifact's llaso_config.json (a projector file: the one beside it; older artifacts
    and the released checkpoint: (1, False)); None if nothing records them (a bare projector file)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if is_llava_checkpoint(folder):
        return 1, False
    if not (folder / "llaso_config.json").is_file():
        return None
    saved = json.loads((folder / "llaso_config.json").read_text())
    return saved.get("stack", ModelConfig.stack), saved.get("trim_audio", ModelConfig.trim_audio)


# ----- The released LLaSO-Base-3.8B-Instruct: the reference's LLaVA-style checkpoint, loaded directly ---------------

LLAVA_PROJECTOR = "model.mm_audio_aligner.projector."
LLAVA_AUDIO_TOWER = "model.audio_tower."


def is_llava_checkpoint(folder: Path) -> bool:
    config = Path(folder) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "llava_llama"


def check_llava_layout(folder: Path, llama_config, encoder_config) -> str | None:
    """Every tensor of the released checkpoint must have its place and shape in our modules (built on the meta
    device; the data is not read). Returns the audio tower's prefix, None if it holds no encoder."""
    shapes = {}
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    conv1 = [k for k in shapes if k.startswith(LLAVA_AUDIO_TOWER) and k.endswith("conv1.weight")]
    encoder_prefix = conv1[0][: -len("conv1.weight")] if len(conv1) == 1 else None
    with torch.device("meta"):
        parts = [("", LlamaForCausalLM(llama_config)),
                 (LLAVA_PROJECTOR, make_projector(encoder_config.d_model, llama_config.hidden_size))]
        if encoder_prefix is not None:
            parts.append((encoder_prefix, WhisperEncoder(encoder_config)))
    expected = {prefix + k: tuple(v.shape) for prefix, m in parts for k, v in m.state_dict().items()}
    if llama_config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: stored once, as the input embedding
    unmapped = sorted(k for k in shapes if k not in expected)
    missing = sorted(k for k in expected if k not in shapes)
    wrong = sorted(f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k])
    if unmapped or missing or wrong:
        raise ValueError(f"{folder}: the checkpoint does not fit the LLaSO layout.\n  unmapped: {unmapped}\n"
                         f"  missing: {missing}\n  wrong shape: {wrong}")
    return encoder_prefix


def load_llava(folder: Path, encoder: str | None, encoder_dtype, llm_dtype) -> LLaSO:
    """Llama under `model.`/`lm_head`, the projector under LLAVA_PROJECTOR, the encoder's weights under the audio
    tower if the checkpoint holds one, else from `encoder`. The config's `mm_audio_tower` is a path on the authors'
    machine, so the Whisper config and feature extractor come from `encoder` (default openai/whisper-large-v3)."""
    raw = json.loads((folder / "config.json").read_text())
    llama_config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    tower = raw.get("mm_audio_tower")
    encoder = encoder or (tower if tower and Path(tower).is_dir() else ModelConfig.encoder)
    encoder_config = WhisperConfig.from_pretrained(resolve(encoder, weights=False))
    encoder_prefix = check_llava_layout(folder, llama_config, encoder_config)
    # transformers streams the Llama tensors shard by shard and skips the projector/audio-tower ones
    llm = LlamaForCausalLM.from_pretrained(folder, config=llama_config, dtype=llm_dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_audio_tokens(llm, tokenizer)  # the released tokenizer already has them: nothing is resized
    enc, features = load_encoder(encoder, encoder_dtype, (folder, encoder_prefix) if encoder_prefix else None)
    projector = load_prefixed(make_projector(encoder_config.d_model, llama_config.hidden_size), folder, LLAVA_PROJECTOR)
    config = ModelConfig(encoder=encoder, llm=str(folder), max_text_len=raw.get("tokenizer_model_max_length", 2048))
    model = LLaSO(config, enc, features, projector.float(), llm, tokenizer)
    model.own_encoder = encoder_prefix is not None
    return model


# ----- Presets: the paper's models; a tiny random pair (committed); random weights in the paper's shapes ------------
# (llaso-random, for benchmarks). sample/make_models.py makes the random ones, apart from the model's code.

TINY = Path(__file__).resolve().parent / "sample" / "models" / "tiny"


@functools.cache
def make_models():
    """sample/make_models.py, loaded (once) by its path: the sample folder is not a package."""
    spec = importlib.util.spec_from_file_location("make_models", TINY.parents[1] / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset(name: str) -> ModelConfig:
    """llaso-random is written to the cache folder on first use (7.7 GB of bf16 weights)."""
    if name == "llaso":
        return ModelConfig()
    if name == "tiny":
        folder = TINY
    else:
        from data import DEFAULT_CACHE_DIR

        builders = make_models()
        folder = builders.build_random(DEFAULT_CACHE_DIR / f"llaso-random-v{builders.RANDOM_VERSION}")
    return ModelConfig(encoder=str(folder / "encoder"), llm=str(folder / "llm"))


def preset_parts(name: str):
    """(Whisper config, LLM config, tokenizer) of a preset: everything but the weights."""
    if name == "llaso-random":
        return make_models().random_parts()
    config = preset(name)
    return (WhisperConfig.from_pretrained(resolve(config.encoder, weights=False)),
            AutoConfig.from_pretrained(resolve(config.llm, weights=False)), AutoTokenizer.from_pretrained(config.llm))


def parameter_counts(encoder_config, llm_config, tokenizer) -> dict[str, int]:
    """Parameters of each part, the five new token rows included, counted on the meta device: nothing allocated."""
    with torch.device("meta"):
        encoder, llm = WhisperEncoder(encoder_config), AutoModelForCausalLM.from_config(llm_config)
        add_audio_tokens(llm, tokenizer)
        projector = make_projector(encoder_config.d_model, llm_config.hidden_size)
    return {name: sum(p.numel() for p in part.parameters())
            for name, part in [("encoder", encoder), ("projector", projector), ("llm", llm)]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "llaso", "llaso-random"],
                        help="models whose parameters to count, on the meta device (no weights loaded or allocated)")
    parser.add_argument("--convert", metavar="DIR", help="a released LLaSO checkpoint to convert to a stage-2 artifact")
    parser.add_argument("--out", help="where --convert writes the artifact")
    parser.add_argument("--encoder", help="Whisper id or directory for --convert (default openai/whisper-large-v3)")
    args = parser.parse_args(argv)
    if args.convert:
        if not args.out:
            parser.error("--convert needs --out")
        LLaSO.load(args.convert, encoder=args.encoder).save(args.out, with_llm=True)
        print(f"wrote {args.out}")
        return
    for name, count in parameter_counts(*preset_parts(args.preset)).items():
        print(f"{name}: {count:,} parameters")


if __name__ == "__main__":
    main()
