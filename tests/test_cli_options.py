"""Each generation flag, passed to the real `torchchat.py` process, does what it says.

Every test runs the CLI once with several flags and compares what it prints with an in-process
LocalGenerator given the same settings; each also checks, in process, that the setting changes the
output (so that a CLI dropping the flag prints something else). A flag the CLI drops on its way to
the generator fails here: --dtype, --quantize, --compile, --system-prompt, --num-samples, --top-k, --seed.
"""

import io
from dataclasses import replace

from tests.generators import tiny_source
from tests.cli_process import chat_transcript, torchchat
from torchchat.chat_format import chat_format_for
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import LocalGenerator
from torchchat.tokenizer import load_tokenizer

PROMPT = "Once upon a time"


def in_process(tiny, max_seq_len: int, max_batch: int = 1, **runtime) -> LocalGenerator:
    """The generator the CLI should build, built here (not through cli.py) with ``runtime`` flags."""
    source = tiny_source(tiny)
    tokenizer = load_tokenizer(source)
    return LocalGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source), max_seq_len=max_seq_len,
                                      max_batch=max_batch, out=io.StringIO(), err=io.StringIO(), **runtime)


def generate_len(tiny, args: GenerationArgs) -> int:
    """The KV cache length `generate` gives PROMPT: its tokens plus the new ones."""
    tokenizer = load_tokenizer(tiny_source(tiny))
    return len(tokenizer.encode(PROMPT, bos=tokenizer.add_bos)) + args.max_new_tokens


def completions(gen: LocalGenerator, args: GenerationArgs) -> list[str]:
    return [c.text for c in gen.complete(Turn(gen.encode_prompt(PROMPT), args))]


def test_quantize_and_top_k_reach_the_generator(tiny_model):
    """--quantize int8 with --top-k 1 at temperature 5: the int8 model's greedy text (one token left to
    sample from), which differs from the fp32 model's."""
    greedy = GenerationArgs(max_new_tokens=12, temperature=0)
    length = generate_len(tiny_model, greedy)
    want = completions(in_process(tiny_model, length, quantize="int8"), greedy)[0]
    assert want != completions(in_process(tiny_model, length), greedy)[0]  # int8 changes these tokens
    proc = torchchat("generate", *tiny_model.cli_flags(), "--prompt", PROMPT, "--max-new-tokens", "12",
                     "--quantize", "int8", "--top-k", "1", "--temperature", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + want + "\n"


def test_dtype_and_system_prompt_reach_the_chat(tiny_model):
    """chat --dtype bf16 --system-prompt: the bf16 model's replies to the chat that starts with that system
    message; both fp32 with it and bf16 without it print other replies."""
    lines, system = ["Hi there", "Tell me more"], "You are a pirate."
    args = GenerationArgs(max_new_tokens=16, temperature=0)
    bf16 = in_process(tiny_model, 512, dtype="bf16")  # chat: the cache holds the model's context, 512
    want = chat_transcript(bf16, lines, args, system)
    assert want != chat_transcript(bf16, lines, args, None)
    assert want != chat_transcript(in_process(tiny_model, 512), lines, args, system)
    proc = torchchat("chat", *tiny_model.cli_flags(), "--max-new-tokens", "16", "--temperature", "0",
                     "--dtype", "bf16", "--system-prompt", system, stdin="".join(f"{line}\n" for line in lines))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want
    assert proc.stdout.count("Assistant: ") == 2


def test_compile_num_samples_seed_and_top_k(tiny_model):
    """--compile --num-samples 3 --seed --top-k 8: three seeded samples printed one after another, equal to
    the eager in-process ones (a compiled step's logits differ from eager ones by rounding at most, far
    from moving a sampled token), and Dynamo's log shows the decode step traced and handed to Inductor.
    (Inductor's default cache is kept: this test took 25-48 s with an empty one, 6-12 s with it warm.)"""
    args = GenerationArgs(max_new_tokens=20, temperature=1.0, top_k=8, seed=11, num_samples=3)
    eager = in_process(tiny_model, generate_len(tiny_model, args), max_batch=3)
    want = completions(eager, args)
    assert len(set(want)) == 3  # three different samples
    assert want != completions(eager, replace(args, seed=12))
    assert want != completions(eager, replace(args, top_k=None))
    proc = torchchat("generate", *tiny_model.cli_flags(), "--prompt", PROMPT, "--max-new-tokens", "20",
                     "--temperature", "1", "--top-k", "8", "--seed", "11", "--num-samples", "3", "--compile",
                     env={"TORCH_LOGS": "dynamo"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + "".join(f"\n--- sample {i} ---\n{text}\n" for i, text in enumerate(want))
    compiled = ("torchdynamo done tracing _forward_one", "done compiler function inductor")
    assert all(line in proc.stderr for line in compiled), "no compile: --compile did not reach the generator"
