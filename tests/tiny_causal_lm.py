"""Tiny random causal LMs with a word-level tokenizer built offline (no hub downloads)."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball",
    "the model reads the text and predicts the next word",
    "we count the tokens and average the loss over them",
    "rain fell on the old town while the river rose",
]


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def save_tiny(directory: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A random 2-layer model of `kind` ('llama' or 'gpt2') and its tokenizer in `directory`."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    vocab = len(tokenizer)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, eos_token_id=2, bos_token_id=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, pad_token_id=0, eos_token_id=2,
                                           bos_token_id=2))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
