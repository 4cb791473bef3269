"""The rows and the table: ratios against transformers, greedy agreement, plain and Markdown output."""

from __future__ import annotations

import sys
from dataclasses import asdict

from benchlib.cases import Result


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same token, length of the common prefix)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0.0, 0
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return same / n, prefix


def annotate(results: list[Result]) -> list[dict]:
    """Rows for the table and the JSON: ratios against transformers of the same model and dtype, and
    greedy agreement against torchchat fp32 eager (the reference) of the same model, each among the runs
    with the same number of CPU hogs; beside hogs, ``kept``: the decode speed over the same case's quiet one."""
    rows = []
    for r in results:
        row = asdict(r)
        same_load = [p for p in results if p.busy == r.busy]
        peer = next((p for p in same_load if p.engine == "transformers" and p.model == r.model
                     and p.dtype == r.dtype), None)
        reference = "fp32 summary" if r.setting.endswith(" summary") else "fp32"  # the same prompt
        ref = next((p for p in same_load if p.engine == "torchchat" and p.model == r.model
                    and p.setting == reference), None)
        if "+draft" in r.setting and ref is not None and ref.decode_tok_s:
            row["decode_vs_plain"] = r.decode_tok_s / ref.decode_tok_s  # speculative decoding's gain
        quiet = next((p for p in results if not p.busy and (p.engine, p.model, p.setting) == (r.engine, r.model,
                                                                                               r.setting)), None)
        if r.busy and quiet is not None and quiet.decode_tok_s:
            row["kept"] = r.decode_tok_s / quiet.decode_tok_s
        if peer is not None and r.engine == "torchchat":
            row["decode_vs_hf"] = r.decode_tok_s / peer.decode_tok_s if peer.decode_tok_s else None
            row["prefill_vs_hf"] = r.prefill_tok_s / peer.prefill_tok_s if peer.prefill_tok_s else None
        lcpp = next((p for p in same_load if p.engine == "llama.cpp" and p.model == r.model
                     and p.dtype == LLAMA_CPP_TYPES.get(r.setting.split(" compile")[0])), None)
        if lcpp is not None and r.engine == "torchchat" and lcpp.decode_tok_s:
            row["decode_vs_llama_cpp"] = r.decode_tok_s / lcpp.decode_tok_s
        if ref is not None and r.tokens and r is not ref:
            row["agree_vs_fp32"], row["prefix_vs_fp32"] = agreement(ref.tokens, r.tokens)
        row["pct_of_ceiling"] = 100 * r.decode_tok_s / r.ceiling_tok_s if r.ceiling_tok_s else None
        rows.append(row)
    return rows


# Our setting (without "compile") -> the llama.cpp file type it is compared with.
LLAMA_CPP_TYPES = {"fp32": "F32", "bf16": "BF16", "fp32 int8": "Q8_0", "fp32 int4": "Q4_1", "native": "Q4_1"}

COLUMNS = [  # (title, width, cell)
    ("engine", 13, lambda r: r["engine"]),
    ("model", 14, lambda r: r["model"]),
    ("setting", 26, lambda r: r["setting"]),
    ("hogs", 4, lambda r: str(r.get("busy", 0))),
    ("kept", 5, lambda r: f"{r['kept']:.2f}" if r.get("kept") is not None else "-"),
    ("TTFT s", 8, lambda r: f"{r['ttft_s']:.3f}"),
    ("prefill/s", 10, lambda r: f"{r['prefill_tok_s']:.1f}"),
    ("decode/s", 9, lambda r: f"{r['decode_tok_s']:.2f}"),
    ("ceil%", 6, lambda r: f"{r['pct_of_ceiling']:.0f}%" if r.get("pct_of_ceiling") is not None else "-"),
    ("dec/HF", 7, lambda r: f"{r['decode_vs_hf']:.2f}x" if r.get("decode_vs_hf") else "-"),
    ("pre/HF", 7, lambda r: f"{r['prefill_vs_hf']:.2f}x" if r.get("prefill_vs_hf") else "-"),
    ("spec x", 6, lambda r: f"{r['decode_vs_plain']:.2f}x" if r.get("decode_vs_plain") else "-"),
    ("dec/l.cpp", 9, lambda r: f"{r['decode_vs_llama_cpp']:.2f}x" if r.get("decode_vs_llama_cpp") else "-"),
    ("load s", 7, lambda r: f"{r['load_s']:.2f}"),
    ("RSS MB", 7, lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("warmup s", 9, lambda r: f"{r['warmup_s']:.1f}"),
    ("same/prefix", 12, lambda r: (f"{100 * r['agree_vs_fp32']:.0f}%/{r['prefix_vs_fp32']}"
                                   if r.get("agree_vs_fp32") is not None else "ref" if _is_reference(r) else "-")),
]


BUSY_COLUMNS = ("hogs", "kept")  # shown only when some row ran beside CPU hogs
SPECULATION_COLUMNS = ("spec x",)  # shown only when some row speculated


def _is_reference(row: dict) -> bool:
    return row["engine"] == "torchchat" and row["setting"] in ("fp32", "fp32 summary")


def columns(rows: list[dict]) -> list:
    hidden = (() if any(r.get("busy") for r in rows) else BUSY_COLUMNS) + \
        (() if any(r.get("decode_vs_plain") for r in rows) else SPECULATION_COLUMNS)
    return [c for c in COLUMNS if c[0] not in hidden]


def print_table(rows: list[dict], out=sys.stdout):
    """One line per row; the first three columns left-aligned, the figures right-aligned."""
    cols = columns(rows)

    def line(cells):
        return " ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, cols)))
    print(line([title for title, _, _ in cols]), file=out)
    for r in rows:
        print(line([cell(r) for _, _, cell in cols]), file=out)


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    cols = columns(rows)
    lines = ["| " + " | ".join(title for title, _, _ in cols) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, _, cell in cols) + " |" for r in rows]
    return "\n".join(lines)
