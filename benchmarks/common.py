"""Shared helpers of the benchmarks: ONE JSON envelope for every result file, one thread, a lean Trainer.

Every result file is ``{"benchmark": str, "settings": {...}, "environment": {...}, "results": [row, ...]}``,
written atomically by :func:`write_result` and read back (validated) by :func:`load_result`. ``results`` is a
list of FLAT rows, one per measured case: each value is a JSON scalar (str, int, float, bool, null) or a list
of scalars; nested dicts are flattened with dotted keys (:func:`flatten`). Where a file holds both single runs
and the means the benchmark computed over them, rows carry ``"kind"`` (e.g. ``"run"`` / ``"mean"``).
Non-finite floats are written as null (NaN: not measured) or the strings ``"inf"``/``"-inf"``.

Output directory: ``--results-dir`` of each benchmark, else the environment variable
``LIGHTNING_GI_BENCH_RESULTS``, else ``benchmarks/results/`` (the committed numbers); ``--smoke`` runs without
either go to ``<temp dir>/lightning_gi_bench_smoke/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
ENVELOPE_KEYS = ("benchmark", "settings", "environment", "results")
RESULTS_ENV = "LIGHTNING_GI_BENCH_RESULTS"
Scalar = Union[str, int, float, bool, None]


# ------------------------------------------------------------------------------------------------ output place
def results_dir(override: Optional[Union[str, Path]] = None, smoke: bool = False) -> Path:
    """Where result files go: ``override``, else ``$LIGHTNING_GI_BENCH_RESULTS``, else benchmarks/results/ (a
    ``--smoke`` run: ``<temp dir>/lightning_gi_bench_smoke/``, so that it never overwrites the committed numbers)."""
    chosen = override or os.environ.get(RESULTS_ENV)
    if chosen:
        return Path(chosen)
    return Path(tempfile.gettempdir()) / "lightning_gi_bench_smoke" if smoke else RESULTS


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--smoke`` (tiny settings, seconds: for tests) and ``--results-dir`` on every benchmark."""
    parser.add_argument("--smoke", action="store_true", help="tiny settings that run in seconds (checks the script end to end)")
    parser.add_argument("--results-dir", default=None,
                        help=f"directory of the JSON result (default ${RESULTS_ENV} or benchmarks/results/)")
    return parser


# ------------------------------------------------------------------------------------------------ envelope
def environment(device: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """Versions, threads, device and date of this run (the envelope's ``environment``)."""
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import pytorch_lightning as pl

        env["pytorch_lightning"] = pl.__version__
    except ImportError:
        pass
    if device is not None:
        env["device"] = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        env["load_average"] = list(os.getloadavg())
    env.update(extra)
    return env


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); lists kept."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_row(row: Any, where: str = "row") -> None:
    """Raise ValueError unless ``row`` is a flat dict (scalars or lists of scalars)."""
    if not isinstance(row, dict) or not row:
        raise ValueError(f"{where} must be a non-empty dict, got {type(row).__name__}")
    for key, value in row.items():
        if not isinstance(key, str):
            raise ValueError(f"{where} has a non-string key {key!r}")
        if _is_scalar(value):
            continue
        if isinstance(value, list) and all(_is_scalar(v) for v in value):
            continue
        raise ValueError(f"{where} key {key!r} is not flat (a scalar or a list of scalars): {type(value).__name__}")


def check_envelope(payload: Any, where: str = "result") -> dict[str, Any]:
    """Raise ValueError unless ``payload`` is a valid envelope; returns it."""
    if not isinstance(payload, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(payload).__name__}")
    if set(payload) != set(ENVELOPE_KEYS):
        raise ValueError(f"{where} must have exactly the keys {list(ENVELOPE_KEYS)}, got {sorted(payload)}")
    if not isinstance(payload["benchmark"], str) or not payload["benchmark"]:
        raise ValueError(f"{where}: 'benchmark' must be a non-empty string")
    for key in ("settings", "environment"):
        if not isinstance(payload[key], dict):
            raise ValueError(f"{where}: {key!r} must be an object")
    if not isinstance(payload["results"], list):
        raise ValueError(f"{where}: 'results' must be a list of rows")
    for i, row in enumerate(payload["results"]):
        check_row(row, f"{where}: results[{i}]")
    return payload


def write_result(benchmark: str, settings: dict[str, Any], results: list[dict[str, Any]], *,
                 name: Optional[str] = None, out: Optional[Union[str, Path]] = None,
                 env: Optional[dict[str, Any]] = None, quiet: bool = False) -> Path:
    """Write the envelope to ``<out or results_dir()>/<name or benchmark>.json`` atomically; returns the path.

    ``out`` may also be a path ending in ``.json`` (then ``name`` is ignored). Rows are flattened; the envelope
    is validated before anything is written.
    """
    payload = {
        "benchmark": benchmark,
        "settings": _json_safe(dict(settings)),
        "environment": _json_safe(env if env is not None else environment()),
        "results": [_json_safe(flatten(r)) for r in results],
    }
    check_envelope(payload, benchmark)
    if out is not None and str(out).endswith(".json"):
        path = Path(out)
    else:
        path = results_dir(out, smoke=bool(settings.get("smoke"))) / f"{name or benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


def load_result(path: Union[str, Path]) -> dict[str, Any]:
    """Read one result file and validate its envelope (ValueError with the file's name when it is not one)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return check_envelope(payload, str(path))


# ------------------------------------------------------------------------------------------------ running
def single_thread() -> None:
    """Benchmarks run with one thread: under load, 2 OpenMP threads busy-wait (docs/performance_notes.md)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from lightning_gi.cli import quiet_known_warnings

    quiet_known_warnings()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lean_trainer(max_steps: int, **overrides: Any):
    """A Trainer without logger, checkpoints, progress bar or summary (CPU, one device unless overridden)."""
    import pytorch_lightning as pl

    kwargs: dict[str, Any] = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def config_path(name: str) -> Path:
    """``configs/<name>`` of this repository (ValueError when it does not exist)."""
    path = ROOT / "configs" / name
    if not path.is_file():
        raise ValueError(f"config {path} not found")
    return path


def run_recipe(config: Union[str, Path], overrides: list[str], work_dir: Union[str, Path],
               edit: Optional[Callable[[dict[str, Any]], None]] = None) -> tuple[dict[str, Any], Any]:
    """Run a configs/ recipe through ``lightning_gi.cli.run`` with ``overrides`` (``--key=value`` strings), its
    outputs under ``work_dir``; ``edit`` may change the loaded YAML first (e.g. drop a callback of an ablation;
    the edited copy is written to ``work_dir/recipe.yaml``). Returns the run's ``metrics.json`` plus ``seconds``
    (wall time of the whole run) and ``log_dir``, and the CLI object (``.model``, ``.datamodule``, ``.trainer``)."""
    from lightning_gi.cli import run

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(config)
    if edit is not None:
        import yaml

        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["fit", "--config", str(path), "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={work}", *overrides]
    if not any(o.startswith("--trainer.logger=") for o in overrides):
        args.insert(4, f"--trainer.logger.init_args.save_dir={work}")
    t0 = time.perf_counter()
    cli = run(args)
    seconds = time.perf_counter() - t0
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    metrics["seconds"] = seconds
    metrics["log_dir"] = str(cli.trainer.log_dir)
    return metrics, cli


def run_config(config: Union[str, Path], overrides: list[str], work_dir: Union[str, Path],
               edit: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """:func:`run_recipe`, the metrics only."""
    return run_recipe(config, overrides, work_dir, edit)[0]
