"""Finding and loading weights: GGUF, Hugging Face and Meta directories, plain .pth state dicts.

Three steps, each usable alone:

- ``read_model_args(source)`` reads metadata only (config.json, params.json, GGUF keys).
- ``load_state_dict(source, args, keep=, transform=)`` yields torchchat-named tensors one at a
  time, checked strictly against ``expected_shapes(args)``; the distributed code filters with
  ``keep`` and slices its shard in ``transform``, so no rank holds the whole model.
- ``load_model(source, args)`` builds the Transformer on the meta device and assigns the tensors; with
  ``keep_quantized=True`` a file's quantized weights (a GGUF's Q4_0, Q4_1, Q8_0, K-quants) go straight into
  quantized layers (torchchat/quantize.py), never through a full-precision copy.

The formats live in ``torchchat/checkpoints/``; each turns its files into ``LazyTensor``s under
torchchat's names, and this module does the checking and loading for all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from torchchat.catalog import ModelSource
from torchchat.checkpoints import gguf as gguf_format
from torchchat.checkpoints import huggingface, meta, pth
from torchchat.checkpoints.common import (
    GGUF_MAGIC, CheckpointError, LazyTensor, QuantizedTensor, expected_shapes, magic, require_file,
)
from torchchat.checkpoints.gguf import kept_quantized, open_gguf
from torchchat.model import ModelArgs, Transformer

__all__ = ["CheckpointError", "expected_shapes", "kept_quantized", "load_model", "load_state_dict", "open_gguf",
           "read_model_args", "weight_types"]


def read_model_args(source: ModelSource) -> ModelArgs:
    """The model's shape from the checkpoint's metadata (no weights are read)."""
    fmt, path = _format(source)
    return fmt.model_args(path, source.name)


def weight_types(source: ModelSource) -> dict[str, int]:
    """The weight matrices of a GGUF by type, most first ({"Q4_1": 210, "Q8_0": 1}); {} for other formats."""
    fmt, path = _format(source)
    return fmt.weight_types(path) if fmt is gguf_format else {}


def load_state_dict(source: ModelSource, args: ModelArgs, *, keep: Callable[[str], bool] = lambda name: True,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float32,
                    keep_quantized: bool = False) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The weights named as the model's state_dict, those ``keep`` accepts, cast to ``dtype``; with
    ``keep_quantized`` a weight the file holds in a type torchchat runs quantized is a QuantizedTensor instead
    (not passed to ``transform``).

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
    read = _read_quantized if keep_quantized else _read
    return dict(_load(path, found, expected, args, keep, transform or (lambda name, t: t), dtype, read))


def load_model(source: ModelSource, args: ModelArgs, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", keep_quantized: bool = False) -> Transformer:
    """The Transformer with its weights, in eval mode, without gradients. ``keep_quantized`` (CPU only): the
    file's quantized weights become quantized layers; ``dtype`` is then that of the others (norms)."""
    device = torch.device(device)
    if keep_quantized and device.type != "cpu":
        raise CheckpointError(f"quantized layers run on CPU only, not {device}: dequantize the weights (--dtype)")
    with torch.device("meta"), _NoInitializers():  # no memory for weights that are about to be replaced
        model = Transformer(args)
    tied = args.tie_embeddings
    state = load_state_dict(source, args, keep=lambda name: not (tied and name == "output.weight"),
                            transform=lambda name, t: t.to(device), dtype=dtype,  # each to device as read
                            keep_quantized=keep_quantized)
    quantized = {name: t for name, t in state.items() if isinstance(t, QuantizedTensor)}
    for name, weight in quantized.items():
        del state[name]
        _install_quantized(model, name.removesuffix(".weight"), weight, state)
    if tied and "tok_embeddings.weight" in quantized:  # the output layer reads the embedding's very buffers
        _install_module(model, "output", _tied_output(model.tok_embeddings), state)
    elif tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if tied and "tok_embeddings.weight" not in quantized:  # one Parameter, not two sharing storage: .to() and
        model.output.weight = model.tok_embeddings.weight  # parallel plans then keep them one
    return model.to(device).requires_grad_(False).eval()


class _NoInitializers(TorchFunctionMode):
    """Modules built on the meta device skip their initializers (nn.init's): the checkpoint's values replace them.
    Why: meta's normal_ runs through torch._refs, which imports Dynamo and sympy, ~75 MB of a SmolLM2 run's memory,
    into every run, compiled or not."""

    SKIPPED = frozenset({torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
                         torch.nn.init.trunc_normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
        if func in self.SKIPPED and isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            return tensor
        return func(*args, **kwargs)


def _install_quantized(model: Transformer, path: str, weight: QuantizedTensor, state: dict) -> None:
    """Put the quantized layer for ``weight`` at ``path`` (a linear, or the embedding) and its buffers in ``state``."""
    from torchchat import quantize

    if path == "tok_embeddings":
        module = (quantize.Int4Embedding if weight.layout == "int4" else quantize.Int8Embedding)(*weight.tensors)
    elif weight.layout == "int4":
        module = quantize.Int4Linear(*weight.tensors, group_size=32)
    else:
        module = quantize.Int8Linear(*weight.tensors)
    _install_module(model, path, module, state)


def _tied_output(embedding: torch.nn.Module) -> torch.nn.Module:
    from torchchat import quantize

    linear = quantize.Int4Linear if isinstance(embedding, quantize.Int4Embedding) else quantize.Int8Linear
    return linear.tied_to(embedding)


def _install_module(model: Transformer, path: str, module: torch.nn.Module, state: dict) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
    state.update({f"{path}.{key}": value for key, value in module.state_dict().items()})


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


def _load(path, found, expected, args, keep, transform, dtype, read) -> Iterator[tuple[str, torch.Tensor]]:
    for name in expected:
        if args.tie_embeddings and name == "tok_embeddings.weight":
            yield from _load_tied(path, found, keep, transform, dtype, read)
        elif not (args.tie_embeddings and name == "output.weight") and keep(name):
            t = read(path, name, found[name], dtype)
            yield name, t if isinstance(t, QuantizedTensor) else transform(name, t)


def _load_tied(path, found, keep, transform, dtype, read) -> Iterator[tuple[str, torch.Tensor]]:
    """The embedding, given to both names right away, so that the full tensor is not held any longer."""
    names = [n for n in ("tok_embeddings.weight", "output.weight") if keep(n)]
    if not names:
        return
    emb = read(path, "tok_embeddings.weight", found["tok_embeddings.weight"], dtype)
    if "output.weight" in found:  # e.g. torch.save of a tied model: a duplicate, as long as it is one
        out = _read(path, "output.weight", found["output.weight"], dtype)
        same = _read(path, "tok_embeddings.weight", found["tok_embeddings.weight"], dtype) \
            if isinstance(emb, QuantizedTensor) else emb
        if not (out.data_ptr() == same.data_ptr() or torch.equal(out, same)):
            raise CheckpointError(f"{path} has an output.weight that differs from the embedding, but the model "
                                  f"ties them: set tie_word_embeddings / tie_embeddings to false")
        del out, same
    for name in names:
        yield name, emb if isinstance(emb, QuantizedTensor) else transform(name, emb)


def _read(path: Path, name: str, lazy: LazyTensor, dtype: torch.dtype) -> torch.Tensor:
    t = lazy.load()
    if tuple(t.shape) != lazy.shape:  # the data disagrees with the file's own header
        raise CheckpointError(f"tensor {_describe(name, lazy)} in {path} holds {tuple(t.shape)}, its header says "
                              f"{lazy.shape}: the file is corrupt; re-download or re-export it")
    return t.to(dtype)


def _read_quantized(path: Path, name: str, lazy: LazyTensor, dtype: torch.dtype) -> torch.Tensor | QuantizedTensor:
    """The tensor in its quantized layout where the file has one (``lazy.load_quantized``), else as ``_read``."""
    if lazy.load_quantized is None:
        return _read(path, name, lazy, dtype)
    weight = lazy.load_quantized()
    rows, columns = lazy.shape
    first = weight.tensors[0]
    if first.size(0) != rows or first.size(1) * (2 if weight.layout == "int4" else 1) != columns:
        raise CheckpointError(f"tensor {_describe(name, lazy)} in {path} holds {weight.layout} blocks for "
                              f"{tuple(first.shape)}, its header says {lazy.shape}: the file is corrupt")
    return weight


def _describe(name: str, t: LazyTensor) -> str:
    return name if t.file_name == name else f"{t.file_name} ({name})"


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
