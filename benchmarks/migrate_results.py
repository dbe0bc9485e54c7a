"""One-off conversion of the result files written before the JSON envelope (kept to document how they were moved).

Each file in benchmarks/results/ that is not an envelope yet is rewritten as
``{"benchmark", "settings", "environment", "results": [flat rows]}`` (``benchmarks.common.write_result``): the
numbers are MOVED, never recomputed, and the run's recorded environment is kept. ``attack_vs_defense.csv`` (no JSON
before) becomes ``attack_vs_defense.json`` next to it (settings from the Markdown summary's ``Settings:`` line).
Every converted file's ``settings.converted_from`` names the old layout. A check refuses to write a file unless
every number of the old file appears in the new one (as often as before).

    python -m benchmarks.migrate_results [--dir benchmarks/results] [--dry-run]
"""
from __future__ import annotations

if __package__ in (None, ""):  # python benchmarks/migrate_results.py: import this package (not opacus's "benchmarks")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.common import RESULTS, check_envelope, flatten, write_result

NOTE = "pre-envelope layout, moved by benchmarks/migrate_results.py (values unchanged)"
Converted = tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]  # benchmark, settings, env, rows


def _drop(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def dlg_vs_idlg(old: dict[str, Any]) -> Converted:
    rows: list[dict[str, Any]] = []
    for classes, block in old["by_num_classes"].items():
        for case in block["cases"]:
            for attack in ("idlg", "dlg"):
                rows.append({"kind": "case", "num_classes": int(classes), **_drop(case, "idlg", "dlg"), "attack": attack, **case[attack]})
        rows.append({"kind": "summary", "num_classes": int(classes), **block["summary"]})
    settings = {**old["settings"], "label_rule_and_reconstructions": "hand-built attacks (before the configs/ recipes)"}
    return "dlg_vs_idlg", settings, old["environment"], rows


def gias_bench(old: dict[str, Any]) -> Converted:
    from benchmarks.gias_bench import part_rows

    settings: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for part, payload in old.items():
        if part == "environment":
            continue
        s, r = part_rows(part, payload)
        settings[part] = s
        rows += r
    return "gias_bench", settings, old["environment"], rows


def keyed_results(old: dict[str, Any], runs_key: str, case_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """``{"results": {key: {fields..., runs_key: [run, ...]}}}`` -> run rows and summary rows."""
    rows: list[dict[str, Any]] = []
    for key, entry in old["results"].items():
        case = {k: entry[k] for k in case_fields if k in entry}
        rows += [{"kind": "run", "case": key, **case, **run} for run in entry[runs_key]]
        rows.append({"kind": "summary", "case": key, **_drop(entry, runs_key)})
    return rows


def inverting_gradients_resnet18(old: dict[str, Any]) -> Converted:
    settings = {"description": old["benchmark"], "budget": old["budget"]}
    return "inverting_gradients_resnet18", settings, old["environment"], keyed_results(old, "runs", ("batch_size", "tv_weight", "restarts", "steps"))


def wdlg_lenet(old: dict[str, Any]) -> Converted:
    settings = {"description": old["benchmark"], **_drop(old, "benchmark", "environment", "results")}
    return "wdlg_lenet", settings, old["environment"], keyed_results(old, "trials", ("method", "batch_size"))


def inverting_gradients_speed(old: dict[str, Any]) -> Converted:
    settings = {"description": old["benchmark"], "setup": old["setup"], "note": old["note"]}
    summary = {"kind": "summary", **_drop(old, "benchmark", "setup", "note", "environment", "rows")}
    return "inverting_gradients_speed", settings, old["environment"], [{"kind": "run", **r} for r in old["rows"]] + [summary]


def labels(old: dict[str, Any]) -> Converted:
    settings = {**old["settings"], "description": old["benchmark"]}
    rows = [{**r, **old["training"].get(f"{r['victim']}/{r['state']}", {})} for r in old["results"]]
    return "labels", settings, old["environment"], rows


def labels_effect(old: dict[str, Any]) -> Converted:
    settings = {**old["settings"], "description": old["benchmark"]}
    rows = [{"kind": "run", **r} for r in old["results"]]
    rows += [{"kind": "mean", "strategy": name, **means} for name, means in old["summary"].items()]
    return "labels_effect", settings, old["environment"], rows


def loop_overhead(old: dict[str, Any]) -> Converted:
    return "loop_overhead", old["settings"], old["environment"], [{"case": k, **v} for k, v in old["cases"].items()]


def restarts_throughput(old: dict[str, Any]) -> Converted:
    settings = {"device": old["device"], **({"gpu": old["gpu"]} if "gpu" in old else {})}
    return "restarts_throughput", settings, old["environment"], old["results"]


def speed(old: dict[str, Any]) -> Converted:
    from benchmarks.speed import flat_rows

    return "speed", old["settings"], old["environment"], flat_rows(old["results"])


def stepwise_inversion(old: dict[str, Any]) -> Converted:
    rows = [{"kind": "run", "row": row, **entry} for row, entries in old["runs"].items() for entry in entries]
    rows += [{"kind": "mean", "row": row, **means} for row, means in old["summary"].items()]
    settings = {**old["args"], "lpips_note": old["lpips_note"],
                "paper_ablation_resnet34_224px_b8_15k": old["paper_ablation_resnet34_224px_b8_15k"],
                "rows_built": "by hand (before the configs/stepwise_demo.yaml recipe runs)"}
    return "stepwise_inversion", settings, old["environment"], rows


def stepwise_labels(old: dict[str, Any]) -> Converted:
    rows: list[dict[str, Any]] = []
    for state, block in old["models"].items():
        for case, per_strategy in block["results"].items():
            n, k = (int(v) for v in case.split("/"))
            rows += [{"state": state, "batch_size": n, "num_distinct": k, "strategy": name, **r, **block["info"]}
                     for name, r in per_strategy.items()]
    return "stepwise_labels", {**old["args"], "case_names": old["cases"]}, old["environment"], rows


def attack_vs_defense_csv(csv_path: Path) -> Converted:
    """The CSV's rows with their numeric types back (``nan`` LPIPS: not measured -> null)."""
    ints = {"case"}
    texts = {"attack", "defense"}
    rows = []
    with open(csv_path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                row[k] = v if k in texts else (int(v) if k in ints else float(v))
            rows.append(row)
    settings: dict[str, Any] = {}
    md = csv_path.with_suffix(".md")
    if md.exists():
        line = next((ln for ln in md.read_text().splitlines() if ln.startswith("Settings: ")), "")
        for item in line[len("Settings: "):].split(", "):
            if "=" in item:
                k, v = item.split("=", 1)
                settings[k] = _number(v)
    env = {"recorded": False, "note": "the CSV layout recorded no environment"}
    return "attack_vs_defense", settings, env, rows


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


CONVERTERS: dict[str, Callable[[dict[str, Any]], Converted]] = {
    "dlg_vs_idlg": dlg_vs_idlg, "dlg_labels": dlg_vs_idlg, "gias_bench": gias_bench,
    "inverting_gradients_resnet18": inverting_gradients_resnet18, "inverting_gradients_speed": inverting_gradients_speed,
    "wdlg_lenet": wdlg_lenet, "labels": labels, "labels_64px": labels, "labels_quick_v1": labels,
    "labels_effect": labels_effect, "loop_overhead": loop_overhead, "restarts_throughput": restarts_throughput,
    "speed": speed, "speed_lbfgs": speed,
}


def converter(stem: str) -> Optional[Callable[[dict[str, Any]], Converted]]:
    if stem in CONVERTERS:
        return CONVERTERS[stem]
    for prefix, fn in (("stepwise_inversion_", stepwise_inversion), ("stepwise_labels_", stepwise_labels), ("restarts_throughput_", restarts_throughput)):
        if stem.startswith(prefix):
            return fn
    return None


def numbers(value: Any) -> Counter:
    """Every number (not bool) in a JSON value, as a multiset (NaN as the string 'nan')."""
    out: Counter = Counter()
    if isinstance(value, bool) or value is None:
        return out
    if isinstance(value, (int, float)):
        out["nan" if value != value else float(value)] += 1
    elif isinstance(value, dict):
        for v in value.values():
            out += numbers(v)
    elif isinstance(value, list):
        for v in value:
            out += numbers(v)
    return out


def check_kept(old: Any, new: dict[str, Any], name: str) -> None:
    """Every number of ``old`` is in ``new`` at least as often (NaN may become null: "not measured")."""
    have = numbers(new)
    missing = {k: c - have.get(k, 0) for k, c in numbers(old).items() if k != "nan" and have.get(k, 0) < c}
    if missing:
        raise ValueError(f"{name}: numbers lost in the conversion: {list(missing.items())[:5]}")


def migrate(directory: Path, dry_run: bool = False) -> list[Path]:
    written = []
    for path in sorted(directory.glob("*.json")):
        old = json.loads(path.read_text())
        try:
            check_envelope(old)
            continue  # already an envelope
        except ValueError:
            pass
        fn = converter(path.stem)
        if fn is None:
            raise SystemExit(f"{path}: no converter for this file (add one to benchmarks/migrate_results.py)")
        benchmark, settings, env, rows = fn(old)
        new = {"settings": {**settings, "converted_from": NOTE}, "environment": env, "results": [flatten(r) for r in rows]}
        check_kept(old, new, path.name)
        if not dry_run:
            written.append(write_result(benchmark, new["settings"], rows, out=path, env=env))
    csv_path = directory / "attack_vs_defense.csv"
    if csv_path.exists() and not (directory / "attack_vs_defense.json").exists():
        benchmark, settings, env, rows = attack_vs_defense_csv(csv_path)
        if not dry_run:
            written.append(write_result(benchmark, {**settings, "converted_from": "attack_vs_defense.csv (+ .md settings line)"},
                                        rows, out=directory / "attack_vs_defense.json", env=env))
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(RESULTS), help="directory of the result files")
    parser.add_argument("--dry-run", action="store_true", help="convert and check, write nothing")
    args = parser.parse_args(argv)
    written = migrate(Path(args.dir), args.dry_run)
    print(f"{len(written)} file(s) converted" + (" (dry run)" if args.dry_run else ""))


if __name__ == "__main__":
    main()
