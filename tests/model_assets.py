"""Tiny random-weight checkpoints written by tests (fixed seed), with a Meta-style params.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.assets import write_byte_tiktoken
from torchchat.model import ModelArgs, Transformer

# dim 64 -> Meta's hidden size rule with multiple_of 32 gives 192.
TINY_PARAMS = {"dim": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512,
               "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 512}
TINY_ARGS = ModelArgs(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=192,
                      max_context=512)


@dataclass
class TinyModel:
    checkpoint: Path  # model.pth
    tokenizer: Path  # byte-level tiktoken file (vocab 512 with Llama 3 specials)
    args: ModelArgs

    def cli_flags(self) -> list[str]:
        return ["--checkpoint-path", str(self.checkpoint), "--tokenizer-path", str(self.tokenizer)]


def write_tiny_model(directory: Path, seed: int = 0) -> TinyModel:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Transformer(TINY_ARGS)
    with torch.no_grad():  # larger weights than the default init make greedy text less repetitive
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    torch.save(model.state_dict(), directory / "model.pth")
    (directory / "params.json").write_text(json.dumps(TINY_PARAMS))
    tokenizer = write_byte_tiktoken(directory / "tokenizer.model")
    return TinyModel(directory / "model.pth", tokenizer, TINY_ARGS)
