"""A tiny randomly initialised Llama-style model with its own small BPE tokenizer and
a chat template, saved as an ordinary Hugging Face folder: what the engine's unit tests
run on (seconds on a CPU, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from workers.ml import synthetic

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    lines = []
    for person in synthetic.people(40, seed=3):
        for item in synthetic.qa_items(person) + synthetic.paraphrase_items(person):
            lines += [item["prompt"], item["completion"]]
    return [*lines, "The capital of France is Paris.", "Water boils at 100 degrees."]


def build(
    folder: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0, family: str = "llama"
) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    special = {
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
        "bos_token_id": fast.bos_token_id,
    }
    torch.manual_seed(seed)
    model: Any
    if family == "gpt2":  # Conv1D projections: PEFT's fan_in_fan_out path
        config = GPT2Config(
            vocab_size=len(fast),
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            **special,
        )
        model = GPT2LMHeadModel(config)
    elif family == "qwen2":
        qwen = Qwen2Config(
            vocab_size=len(fast),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **special,
        )
        model = Qwen2ForCausalLM(qwen)
    else:
        llama = LlamaConfig(
            vocab_size=len(fast),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **special,
        )
        model = LlamaForCausalLM(llama)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder
