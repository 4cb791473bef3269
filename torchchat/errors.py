"""The user-facing error types, and the exit codes the CLI and the launcher turn them into.

No torch import: the CLI's ``--help`` and a bad flag must not pay for loading torch.

Every error here is a ConfigError: a problem the user can fix, with a message that names the fix.
The CLI prints it as one line and exits EXIT_USER_ERROR; the server answers 400.
"""


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not match the model: one line naming the fix."""


class TokenizerError(ConfigError):
    """A tokenizer that cannot be found or read: one line naming the file and the fix."""


class ChatFormatError(ConfigError):
    """Messages a chat format cannot encode, or a chat template that cannot be used: one line."""


class ContextFull(ConfigError):
    """The conversation no longer fits in the KV cache."""


# Exit codes of the CLI and of each rank of a distributed job (the launcher reads the ranks' codes).
EXIT_OK = 0
EXIT_ERROR = 1  # a bug or an unexpected failure: a traceback was printed
EXIT_USER_ERROR = 2  # a ConfigError or a bad flag: one line was printed
EXIT_PEER_FAILED = 3  # this rank stopped because another rank failed (an echo, not the cause)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
