"""How the processes of a job are arranged: tensor-parallel degree x pipeline stages, and the mesh.

Everything here is checked before any weight loads, with the numbers and the fix in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchchat.errors import ConfigError
from torchchat.model import KNOWN_MODELS, ModelArgs


@dataclass(frozen=True)
class ParallelDims:
    """``tp`` processes per pipeline stage, ``pp`` stages: ``tp * pp`` must be the world size."""

    tp: int  # tensor-parallel degree: processes that share each layer (heads and feed-forward split)
    pp: int  # pipeline stages: each holds a contiguous run of layers
    world_size: int  # processes in the job

    def __post_init__(self):
        for flag, value in (("--tp", self.tp), ("--pp", self.pp)):
            if value < 1:
                raise ConfigError(f"{flag} ({value}) must be at least 1")
        if self.tp * self.pp != self.world_size:
            raise ConfigError(f"--tp {self.tp} x --pp {self.pp} = {self.tp * self.pp} processes, but the world size "
                              f"is {self.world_size}: run torchrun --nproc-per-node {self.tp * self.pp} "
                              f"(or change --tp/--pp)")

    def check_model(self, args: ModelArgs, name: str | None = None):
        """Can this model be split this way? Run before any weight loads."""
        name = name or _known_name(args)
        if self.pp > args.n_layers:
            raise ConfigError(f"--pp {self.pp} stages but {name} has {args.n_layers} layers; "
                              f"use at most --pp {args.n_layers}")
        # Sizes a TP shard splits: heads (column-wise attention), the feed-forward and the vocabulary.
        split = {"query heads": args.n_heads, "key/value heads": args.n_kv_heads,
                 "feed-forward size": args.hidden_dim, "vocabulary": args.vocab_size}
        bad = [f"the {what} ({n})" for what, n in split.items() if n % self.tp]
        if bad:
            raise ConfigError(f"--tp {self.tp} must divide {' and '.join(bad)} of {name}; "
                              f"{_suggest_tp(self.tp, split.values())}")

    def check_devices(self, device_type: str, local_world_size: int | None = None):
        """One GPU per process on each node (CPU: any number of processes)."""
        if device_type != "cuda":
            return
        import torch

        needed = self.world_size if local_world_size is None else local_world_size
        visible = torch.cuda.device_count()
        if needed > visible:
            raise ConfigError(f"--tp {self.tp} x --pp {self.pp} needs {needed} GPUs on this node but {visible} "
                              f"are visible; lower --tp/--pp, spread the job over nodes, or pass --device cpu")

    def stage_layers(self, n_layers: int) -> list[range]:
        """Layer indices of each stage: contiguous, the first stages one longer when uneven (30 / 4: 8 8 7 7)."""
        base, extra = divmod(n_layers, self.pp)
        bounds = [0]
        for stage in range(self.pp):
            bounds.append(bounds[-1] + base + (stage < extra))
        return [range(bounds[s], bounds[s + 1]) for s in range(self.pp)]

    def build_mesh(self, device_type: str):
        """The 2-D mesh ("pp", "tp"): pipeline outermost, so that the tp ranks of a stage are
        consecutive (with torchrun's rank order they sit on one node, where all-reduces are cheap)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.tp), mesh_dim_names=("pp", "tp"))


def _known_name(args: ModelArgs) -> str:
    return next((name for name, known in KNOWN_MODELS.items() if _same_shape(known, args)), "the model")


def _same_shape(a: ModelArgs, b: ModelArgs) -> bool:
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _suggest_tp(tp: int, sizes) -> str:
    common = math.gcd(*sizes)
    fits = [d for d in range(2, common + 1) if common % d == 0]
    if not fits:
        return "this model cannot be split by tensor parallelism: use --pp instead"
    best = min(fits, key=lambda d: (abs(d - tp), d))
    return f"try --tp {best}"
