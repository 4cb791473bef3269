"""Finding and loading weights: GGUF, Hugging Face and Meta directories, plain .pth state dicts.

Three steps, each usable alone:

- ``read_model_args(source)`` reads metadata only (config.json, params.json, GGUF keys).
- ``load_state_dict(source, args, keep=, transform=)`` yields torchchat-named tensors one at a
  time, checked strictly against ``expected_shapes(args)``; the distributed code filters with
  ``keep`` and slices its shard in ``transform``, so no rank holds the whole model.
- ``load_model(source, args)`` builds the Transformer on the meta device and assigns the tensors.

The formats live in ``torchchat/checkpoints/``; each turns its files into ``LazyTensor``s under
torchchat's names, and this module does the checking and loading for all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from torchchat.catalog import ModelSource
from torchchat.checkpoints import gguf as gguf_format
from torchchat.checkpoints import huggingface, meta, pth
from torchchat.checkpoints.common import (
    GGUF_MAGIC, CheckpointError, LazyTensor, expected_shapes, magic, require_file,
)
from torchchat.checkpoints.gguf import open_gguf
from torchchat.model import ModelArgs, Transformer

__all__ = ["CheckpointError", "expected_shapes", "load_model", "load_state_dict", "open_gguf", "read_model_args"]


def read_model_args(source: ModelSource) -> ModelArgs:
    """The model's shape from the checkpoint's metadata (no weights are read)."""
    fmt, path = _format(source)
    return fmt.model_args(path, source.name)


def load_state_dict(source: ModelSource, args: ModelArgs, *, keep: Callable[[str], bool] = lambda name: True,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights named as the model's state_dict, those ``keep`` accepts, cast to ``dtype``.

    Each tensor is read (dequantized, merged, permuted), cast, and passed to ``transform(name,
    tensor)`` before the next is read. Strict: a missing, unexpected or misshapen tensor raises
    CheckpointError before any data is read. With ``args.tie_embeddings`` 'output.weight' is the
    embedding's tensor.

    A pipeline stage holding layers 8 to 15 with its tensor-parallel shard of each weight:
    ``load_state_dict(source, args, keep=lambda n: n.startswith(tuple(f"layers.{i}." for i in
    range(8, 16))), transform=lambda n, t: shard(n, t))``.
    """
    fmt, path = _format(source)
    found = fmt.tensors(path, args)
    expected = expected_shapes(args)
    _check(path, found, expected, args, keep)
    return dict(_load(path, found, expected, args, keep, transform or (lambda name, t: t), dtype))


def load_model(source: ModelSource, args: ModelArgs, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """The Transformer with its weights, in eval mode, without gradients."""
    device = torch.device(device)
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = Transformer(args)
    tied = args.tie_embeddings
    state = load_state_dict(source, args, keep=lambda name: not (tied and name == "output.weight"),
                            transform=lambda name, t: t.to(device), dtype=dtype)  # each to device as read
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if tied:  # one Parameter, not two sharing storage: .to() and parallel plans then keep them one
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).requires_grad_(False).eval()


def _format(source: ModelSource):
    """The format module for a source and the path it reads, told apart by content, not file name."""
    if source.gguf_path is not None:
        return gguf_format, Path(source.gguf_path)
    if source.checkpoint_path is not None:
        path = require_file(Path(source.checkpoint_path), "checkpoint file", "check --checkpoint-path")
        head = magic(path)
        if head.startswith(GGUF_MAGIC):
            return gguf_format, path
        if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
            raise CheckpointError(f"{path} is a safetensors file: pass its directory (with config.json) "
                                  f"as --checkpoint-dir")
        return pth, path
    path = Path(source.checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path} (check --checkpoint-dir)")
    is_hf, is_meta = huggingface.is_hf_dir(path), meta.is_meta_dir(path)
    if is_meta and (not is_hf or any(path.glob("consolidated.*.pth"))):
        return meta, path  # a directory with both configs is read as the one whose weights it has
    if is_hf:
        return huggingface, path
    raise CheckpointError(f"{path} has neither config.json (Hugging Face) nor params.json (Meta): point "
                          f"--checkpoint-dir at the model's own directory")


def _check(path: Path, found: dict[str, LazyTensor], expected: dict[str, tuple[int, ...]], args: ModelArgs,
           keep: Callable[[str], bool]) -> None:
    """Strict loading, from metadata alone: report the first problem and how many there are."""
    fix = "the checkpoint does not match the model config (check --model and the checkpoint's config)"
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        t = found[unexpected[0]]
        raise CheckpointError(f"{path} has an unexpected tensor {_describe(unexpected[0], t)} of shape {t.shape}"
                              f"{_more(unexpected)}: {fix}")
    tied_output = args.tie_embeddings and "output.weight" not in found  # read from the embedding
    needed = ["tok_embeddings.weight" if tied_output and n == "output.weight" else n for n in expected if keep(n)]
    missing = [n for n in dict.fromkeys(needed) if n not in found]
    if missing:
        hint = ("; if the output layer shares the embedding, set tie_word_embeddings / tie_embeddings"
                if missing[0] == "output.weight" else "")
        raise CheckpointError(f"{path} lacks tensor {missing[0]} (expected shape {expected[missing[0]]})"
                              f"{_more(missing)}: {fix}{hint}")
    wrong = [n for n, t in found.items() if t.shape != expected[n]]
    if wrong:
        t = found[wrong[0]]
        raise CheckpointError(f"tensor {_describe(wrong[0], t)} in {path} has shape {t.shape}, expected "
                              f"{expected[wrong[0]]}{_more(wrong)}: {fix}")


def _load(path, found, expected, args, keep, transform, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in expected:
        if args.tie_embeddings and name == "tok_embeddings.weight":
            yield from _load_tied(path, found, keep, transform, dtype)
        elif not (args.tie_embeddings and name == "output.weight") and keep(name):
            yield name, transform(name, _read(path, name, found[name], dtype))


def _load_tied(path, found, keep, transform, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The embedding, given to both names right away, so that the full tensor is not held any longer."""
    names = [n for n in ("tok_embeddings.weight", "output.weight") if keep(n)]
    if not names:
        return
    emb = _read(path, "tok_embeddings.weight", found["tok_embeddings.weight"], dtype)
    if "output.weight" in found:  # e.g. torch.save of a tied model: a duplicate, as long as it is one
        out = _read(path, "output.weight", found["output.weight"], dtype)
        if not (out.data_ptr() == emb.data_ptr() or torch.equal(out, emb)):
            raise CheckpointError(f"{path} has an output.weight that differs from the embedding, but the model "
                                  f"ties them: set tie_word_embeddings / tie_embeddings to false")
        del out
    for name in names:
        yield name, transform(name, emb)


def _read(path: Path, name: str, lazy: LazyTensor, dtype: torch.dtype) -> torch.Tensor:
    t = lazy.load()
    if tuple(t.shape) != lazy.shape:  # the data disagrees with the file's own header
        raise CheckpointError(f"tensor {_describe(name, lazy)} in {path} holds {tuple(t.shape)}, its header says "
                              f"{lazy.shape}: the file is corrupt; re-download or re-export it")
    return t.to(dtype)


def _describe(name: str, t: LazyTensor) -> str:
    return name if t.file_name == name else f"{t.file_name} ({name})"


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
