"""Distributed generation: mesh and parallel dims, the TP plan, the PP split, the few collectives.

``torch.distributed`` is imported only here and in ``torchchat/generate/distributed.py``.

- ``parallel_dims``: ParallelDims (tp x pp = world size), model checks, the ("pp", "tp") mesh;
- ``tensor_parallel``: the DTensor plan and its plain-tensor hot path;
- ``plan``: a forward step's plan (rows, tokens, positions) in one fixed-size message, rank 0 to every rank;
- ``pipeline``: the stage split, and how a step's plan, hidden states and logits move between the ranks;
- ``loading``: only this rank's layers and shards from the checkpoint;
- ``collectives``: every communication, named and counted (the sync budget);
- ``process_group``: this process's rank, device and process group (joined by ``torchchat/launch/``).
"""
