"""The command-line flags are frozen: a flag changes only on purpose, with this list updated."""

from torchchat.cli import build_parser

MODEL = {"--checkpoint-dir", "--checkpoint-path", "--gguf-path", "--tokenizer-path", "--model-directory"}
RUNTIME = {"--device", "--dtype", "--compile", "--quantize", "--max-seq-length", "--tp", "--pp"}
SAMPLING = {"--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"}
SPECULATION = {"--draft-model", "--draft-checkpoint-path", "--draft-gguf-path", "--draft-quantize", "--prompt-lookup",
               "--speculate-k"}

FROZEN = {
    "generate": MODEL | RUNTIME | SAMPLING | SPECULATION | {"--prompt", "--num-samples"},
    "chat": MODEL | RUNTIME | SAMPLING | SPECULATION | {"--system-prompt"},
    "eval": MODEL | RUNTIME | {"--text-file", "--batch", "--json"},
    "list": set(),
    "server": MODEL | RUNTIME | SAMPLING | SPECULATION | {"--host", "--port", "--max-batch", "--max-queue",
                                                          "--no-prefix-reuse", "--shutdown-timeout", "--max-body-size",
                                                          "--max-connections", "--allowed-hosts"},
}


def current_flags() -> dict[str, set[str]]:
    commands = build_parser()._subparsers._group_actions[0].choices
    return {name: {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
            for name, sub in commands.items()}


def test_commands_and_flags_are_frozen():
    assert current_flags() == FROZEN


def test_every_flag_has_help_text():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
