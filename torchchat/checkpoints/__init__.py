"""One module per checkpoint format; ``torchchat/checkpoint.py`` is the entry point.

Each format module offers ``model_args(path, name) -> ModelArgs`` (metadata only) and
``tensors(path, args) -> dict[str, LazyTensor]`` keyed by torchchat's parameter names (file names
that map to nothing keep their own name, so the strict check reports them as unexpected).
"""
