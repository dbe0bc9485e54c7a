"""Markdown tables (exact-multiset rate / mean labels off) from one or more ``benchmarks.labels`` result files.

Several files (e.g. one per victim, run in parallel) can be merged into one envelope with ``--merge OUT``;
the merged settings keep each input's settings under ``parts``. A row of a later file replaces a row of an
earlier one for the same victim, state, batch case and strategy (a re-run of one strategy).

    python -m benchmarks.labels_tables benchmarks/results/labels.json
    python -m benchmarks.labels_tables part1.json part2.json --merge benchmarks/results/labels.json
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/labels_tables.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Any, Optional

from benchmarks.common import load_result, write_result


def _cell(row: dict[str, Any]) -> str:
    if row.get("exact") is None:
        return f"failed ({row.get('errors', '?')})"
    return f"{100 * row['exact']:.0f}% / {row['labels_off']:.1f}"


def tables(rows: list[dict[str, Any]]) -> str:
    """One table per (victim, state): strategies down, batch cases across; auto's choices below each table."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["victim"], r["state"]), []).append(r)
    for (victim, state), group in groups.items():
        cases = sorted({(r["batch_size"], r["num_distinct"]) for r in group})
        strategies = list(dict.fromkeys(r["strategy"] for r in group))
        seeds = max(r["trials"] + r.get("errors", 0) for r in group)
        p_true = group[0].get("p_true")
        loss = group[0].get("final_train_loss")
        head = f"**{victim}, {state}** (mean p_true {p_true:.3f}"
        head += f"; final training loss {loss:.3f}" if loss is not None else ""
        out += [head + f"; {seeds} seeds; cells: exact-multiset rate / mean labels off)", ""]
        out.append("| strategy | " + " | ".join(f"{n}/{k}" for n, k in cases) + " |")
        out.append("|---" * (len(cases) + 1) + "|")
        for s in strategies:
            by_case = {(r["batch_size"], r["num_distinct"]): r for r in group if r["strategy"] == s}
            out.append(f"| {s} | " + " | ".join(_cell(by_case[c]) if c in by_case else "-" for c in cases) + " |")
        for name in ("auto", "auto_public"):
            autos = [r for r in group if r["strategy"] == name and _chose(r)]
            if autos:
                chose = "; ".join(
                    f"{r['batch_size']}: " + ", ".join(f"{k} {v}" for k, v in sorted(_chose(r).items()))
                    + (f" (confidence {r['auto_bias_gradient_confidence']:.2f})" if "auto_bias_gradient_confidence" in r else "")
                    for r in autos
                )
                out += ["", f"`{name}` chose: {chose}"]
        out.append("")
    return "\n".join(out)


def _chose(row: dict[str, Any]) -> dict[str, int]:
    if isinstance(row.get("auto_chose"), dict):
        return row["auto_chose"]
    return {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("auto_chose.")}


def _key(row: dict[str, Any]) -> tuple:
    """A row's identity: a later file's row replaces an earlier one with the same key (a re-run of one strategy)."""
    return row["victim"], row["state"], row["batch_size"], row["num_distinct"], row["strategy"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--merge", help="write the rows of all files as one envelope to this .json path")
    args = parser.parse_args(argv)
    payloads = [load_result(f) for f in args.files]
    rows = list({_key(r): r for p in payloads for r in p["results"]}.values())
    if args.merge:
        settings = {"merged_from": [str(f) for f in args.files], "parts": [p["settings"] for p in payloads],
                    "description": payloads[0]["settings"].get("description", "")}
        write_result("labels", settings, rows, out=args.merge, env=payloads[0]["environment"])
    print(tables(rows))


if __name__ == "__main__":
    main()
