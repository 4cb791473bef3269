"""What every format shares: the error type, lazy tensors, the expected shapes, safe file reads."""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from torchchat.errors import CheckpointError, ConfigError
from torchchat.model import KNOWN_MODELS, ModelArgs

# Buffers that older code saved beside the weights; they are recomputed, never loaded.
NON_WEIGHTS = ("rope.freqs", "freqs_cis", "causal_mask", "kv_cache.k_cache", "kv_cache.v_cache")

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode


@dataclass
class LazyTensor:
    """A tensor in a checkpoint: its shape is known from metadata, its data is read by ``load()``.

    ``file_name`` is the name in the file (for messages); ``load`` returns the full tensor in torchchat's
    layout (merged, permuted, dequantized) in whatever dtype the file holds.
    """

    file_name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    file_type: str | None = None  # the file's type of this tensor where it says one (a GGUF's "Q4_1", "F32")
    load_quantized: Callable[[], "QuantizedTensor"] | None = None  # its blocks as they are, where kept quantized


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight read straight from a file's quantized blocks into one of torchchat's layouts (torchchat/quantize.py),
    never through a full-precision copy:

    - ``"int4"``: (packed (out, in / 2) uint8, scales_and_mins (out, in / 32, 2) float16): quantize.Int4Linear's;
    - ``"int8"``: (weight (out, in) int8, scales (out, in / 32) float16): quantize.Int8Linear's block form.
    """

    layout: str
    tensors: tuple[torch.Tensor, ...]
    file_type: str  # what the file held, e.g. "Q4_1", for messages

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """torchchat parameter name -> shape, for the whole model, in the model's state_dict order."""
    dim, q_dim, kv_dim = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (q_dim, dim),
            f"layers.{i}.attention.wk.weight": (kv_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, q_dim),
            f"layers.{i}.feed_forward.w1.weight": (args.hidden_dim, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, args.hidden_dim),
            f"layers.{i}.feed_forward.w3.weight": (args.hidden_dim, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (args.vocab_size, dim)
    return shapes


def default_context(name: str) -> int:
    """max_context when the checkpoint does not say: the known model's, else 4096."""
    known = KNOWN_MODELS.get(name)
    return known.max_context if known is not None else 4096


def is_non_weight(name: str) -> bool:
    return name.endswith(NON_WEIGHTS)


def magic(path: Path, n: int = 9) -> bytes:
    """The first bytes of a file, to tell formats apart by content rather than by file name."""
    with open(path, "rb") as f:
        return f.read(n)


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} ({fix})")
    return path


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {_first_line(e)} (fix or re-download the file)") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object (fix or re-download the file)")
    return data


def torch_load(path: Path) -> dict:
    """torch.load without running code (weights_only) and without reading the tensors (mmap)."""
    head = magic(path, 4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a torch.save file; "
                              f"pass a GGUF with --gguf-path or a model directory with --checkpoint-dir)")
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if not head.startswith(PICKLE_MAGIC) or "mmap" not in str(e):
                raise
            # Files from torch.save(_use_new_zipfile_serialization=False) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path} holds more than tensors and torch.load(weights_only=True) refuses it: "
                                  f"re-save it as a plain state dict") from e
        raise corrupt_error(path, e) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise corrupt_error(path, e) from e


def state_dict_of(path: Path, loaded, strip_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint, unwrapping {"model": ...}; with strip_prefixes, also a prefix
    that every name shares ("_orig_mod." from torch.compile, "model." from a wrapping module)."""
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors): re-save it with "
                              f"torch.save(model.state_dict(), path)")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(loaded):
        other = next(k for k, v in loaded.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{path} entry '{other}' is not a tensor: re-save it with "
                              f"torch.save(model.state_dict(), path)")
    for prefix in ("_orig_mod.", "model.") if strip_prefixes else ():
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def corrupt_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {_first_line(e)}): "
                           f"re-download or re-export it")


def _first_line(e: BaseException, limit: int = 120) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_args(path: Path, **fields) -> ModelArgs:
    """ModelArgs(**fields), with the file named in a validation error."""
    try:
        return ModelArgs(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except TypeError as e:  # a value of the wrong type in the metadata
        raise CheckpointError(f"{path}: bad model metadata ({_first_line(e)}): fix the file") from e
