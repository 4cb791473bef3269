"""A Llama-3-shaped GGUF end to end: a tiny random-weight model with the real Llama 3 vocabulary (llama.cpp's
ggml-vocab-llama-bpe.gguf), Meta's chat template, Llama 3.1 RoPE scaling (rope_freqs) and GQA, its output
tied or its own, F32. Through `generate` and `chat` it gives the greedy tokens of the same weights in a
model.pth with Meta's tiktoken file: the GGUF's tokenizer, template, rope scaling and tensors are each
checked against the independent path.

Both files hold Q and K in Meta's interleaved layout (llama.cpp's converter permutes Hugging Face's back),
so the same tensors go into both.
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from tests import llamacpp_vocab
from tests.assets import LLAMA3_HF_TEMPLATE, llama3_tokenizer_model
from tests.checkpoint_assets import random_state_dict, write_gguf
from tests.ci import IN_CI
from tests.cli_process import chat_transcript, torchchat
from tests.generators import local_generator
from torchchat.catalog import ModelSource
from torchchat.chat_format import JinjaChatFormat, Llama3ChatFormat
from torchchat.checkpoint import read_model_args
from torchchat.checkpoints.gguf import open_gguf
from torchchat.generate.base import GenerationArgs
from torchchat.model import ModelArgs, RopeScaling, rope_frequencies

# Llama 3's head_dim / dim ratio is not needed; what matters is GQA (4 query heads per 2 KV heads) and a
# head_dim whose lowest frequencies RoPE scaling changes (8: wavelengths 6 to 118,000, the longest scaled).
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=96,
                 rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0), max_context=8192)
# <|end_of_text|>, <|eom_id|>, <|eot_id|>: their output rows are zeroed, so that every reply runs to
# --max-new-tokens (a zero logit is never the largest of 128,256 random ones).
STOP_IDS = [128001, 128008, 128009]
PROMPT = "The capital of France is"
# Past a few hundred positions RoPE scaling shows in the tokens: at 16 the scaled angles are all under 0.03.
LONG_PROMPT = " ".join(f"Item {i} of the list is {i * i}." for i in range(120)) + " The next item is"
CHAT = ["Hi there!", "What is 2+2? Answer briefly."]
GREEDY = GenerationArgs(max_new_tokens=12, temperature=0)


def require(condition: bool, message: str):
    if not condition:
        if IN_CI:
            pytest.fail(f"{message}, and CI must run these tests", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def tied_files(tmp_path_factory) -> tuple[ModelSource, ModelSource]:
    return write_llama3_files(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def untied_files(tmp_path_factory) -> tuple[ModelSource, ModelSource]:
    return write_llama3_files(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.fixture(scope="module", params=["untied", "tied"])
def llama3_files(request) -> tuple[ModelSource, ModelSource]:
    return request.getfixturevalue(f"{request.param}_files")


def write_llama3_files(directory, tied: bool) -> tuple[ModelSource, ModelSource]:
    """(the GGUF, the model.pth with Meta's tokenizer file) of the same weights."""
    require(not llamacpp_vocab.missing(), "llama.cpp's test vocabularies are missing: python -m tests.llamacpp_vocab")
    tokenizer = llama3_tokenizer_model()
    require(tokenizer is not None, "Meta's Llama 3 tokenizer is missing: pip install --no-deps llama-models==0.3.0")
    args = ARGS.with_(tie_embeddings=tied)
    state = random_state_dict(args, seed=3)
    with torch.no_grad():
        for t in state.values():  # larger than the default init: a tied tiny model then does not
            if t.dim() == 2:      # just repeat its last token
                t.normal_(0, 0.3)
        state["output.weight"][STOP_IDS] = 0  # tied: the embedding's rows too, in both files alike

    fields = open_gguf(llamacpp_vocab.vocab_files("llama-bpe")[0]).fields
    vocab = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    vocab["tokenizer.chat_template"] = LLAMA3_HF_TEMPLATE
    divisors = (rope_frequencies(args.with_(rope_scaling=None)) / rope_frequencies(args)).numpy()  # llama.cpp's
    gguf_state = {k: v for k, v in state.items() if not (tied and k == "output.weight")}
    gguf_source, _ = write_gguf(directory / "llama3.gguf", gguf_state, args, vocab=vocab,
                                extra={"rope_freqs.weight": (divisors, gguf.GGMLQuantizationType.F32)})

    torch.save(state, directory / "model.pth")  # tied: one storage under both names, as torch.save keeps it
    (directory / "params.json").write_text(json.dumps({
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim, "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "use_scaled_rope": True, "max_seq_len": args.max_context}))
    pth_source = ModelSource("llama3-tiny", checkpoint_path=directory / "model.pth", tokenizer_path=tokenizer)
    return ModelSource("llama3-tiny", gguf_path=gguf_source.gguf_path), pth_source


@pytest.fixture(scope="module")
def generators(llama3_files):
    return tuple(local_generator(source, max_seq_len=2048) for source in llama3_files)


def test_the_gguf_reads_as_the_model_pth(llama3_files):
    gguf_args, pth_args = (read_model_args(source) for source in llama3_files)
    assert gguf_args == pth_args
    assert gguf_args.rope_scaling == RopeScaling(factor=8.0) and gguf_args.n_kv_heads == 2


def test_generate_gives_the_model_pths_greedy_tokens(generators):
    from_gguf, from_pth = generators
    prompt = from_pth.encode_prompt(PROMPT)
    assert from_gguf.encode_prompt(PROMPT) == prompt and prompt[0] == 128000  # Llama 3 adds BOS
    expected = from_pth.run_generate(PROMPT, GREEDY)[0]
    got = from_gguf.run_generate(PROMPT, GREEDY)[0]
    assert got.tokens == expected.tokens and len(set(got.tokens)) > GREEDY.max_new_tokens // 2, got.text
    assert got.text == expected.text


def test_a_long_prompt_gives_the_model_pths_greedy_tokens(generators):
    from_gguf, from_pth = generators
    prompt = from_pth.encode_prompt(LONG_PROMPT)
    assert from_gguf.encode_prompt(LONG_PROMPT) == prompt and len(prompt) > 1000
    assert from_gguf.run_generate(LONG_PROMPT, GREEDY)[0].tokens == from_pth.run_generate(LONG_PROMPT, GREEDY)[0].tokens


def test_chat_gives_the_model_pths_replies(generators):
    from_gguf, from_pth = generators
    assert isinstance(from_gguf.chat_format, JinjaChatFormat)  # the GGUF's own template
    assert isinstance(from_pth.chat_format, Llama3ChatFormat)  # torchchat's built-in Llama 3 format
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHAT[0]},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": CHAT[1]}]
    assert from_gguf.encode_chat(dialog) == from_pth.encode_chat(dialog)
    transcript = chat_transcript(from_pth, CHAT, GREEDY)
    assert chat_transcript(from_gguf, CHAT, GREEDY) == transcript
    assert transcript.count("Assistant: ") == 2


def test_the_command_line_runs_the_gguf(tied_files):
    """`generate` and `chat` as a user runs them on the file (tied, as Llama 3.2 1B and 3B are)."""
    gguf_source, pth_source = tied_files
    from_pth = local_generator(pth_source)
    flags = ["--gguf-path", str(gguf_source.gguf_path), "--max-new-tokens", str(GREEDY.max_new_tokens),
             "--temperature", "0"]
    proc = torchchat("generate", *flags, "--prompt", PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + from_pth.run_generate(PROMPT, GREEDY)[0].text + "\n"
    proc = torchchat("chat", *flags, stdin="".join(line + "\n" for line in CHAT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == chat_transcript(from_pth, CHAT, GREEDY)
