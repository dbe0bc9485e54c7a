"""``lightning-gi``: the LightningCLI entry point (``lightning-gi fit --config configs/X.yaml``).

The project's other tools are subcommands of the same command, each with ``--help``:
``lightning-gi giml --config configs/giml/dcgan_photos.yaml`` (GIML, its own LightningCLI),
``lightning-gi aux-stats --out ...`` (stepwise attack's auxiliary statistics) and
``lightning-gi train-dcgan --dataset photographs`` (the DCGAN priors). Their command lines live in
:mod:`lightning_gi.tools` (one module each, also ``python -m lightning_gi.tools.<module>``), all parsed by
jsonargparse as ``fit`` is: ``--snake_case value`` options, ``--config file.yaml``, typed ``--help``.

``model:`` selects the attack (any :class:`GradientInversionAttack` subclass by class_path) and
``data:`` the victim (any :class:`VictimDataModule` subclass). The CLI always attaches
:class:`ReconstructionReport` (outputs + metrics), :class:`ReconstructionMonitor` (TensorBoard grids),
:class:`DivergenceGuard` (NaN/inf recovery) and a :class:`PeriodicCheckpoint` (``last.ckpt``) unless the
config lists its own instances, writes checkpoints atomically, logs the config as hparams, and prints
where the outputs are at the end.

Exit status: 0 when the run finished; 2 for a bad input (config, files, arguments), reported in one
sentence (``--debug`` shows the traceback); 130 after Ctrl+C and 143 after SIGTERM; 1 for a crash.

Only trusted configs should be run: a config names Python classes by import path, and the CLI imports
and instantiates them (as any LightningCLI does).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

_PACKAGE_DIR = Path(__file__).resolve().parent

_QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*is in `eval` mode.*",
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*IterableDataset.*has `__len__`.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*LightningCLI.s args parameter is intended to run from within Python.*",
)

# Lightning's informational lines that say nothing about the attack (hardware probes, advertising tips).
_QUIET_LOG_LINES = re.compile(
    r"^(GPU available|TPU available|HPU available|IPU available|LOCAL_RANK|Seed set to|💡|Tip:|"
    r"`Trainer.fit` stopped: `max_steps=|You are using a CUDA device)|litlogger|litmodels",
)

_TOP_HELP = """\
usage: lightning-gi [-h] [--version] [--debug] {fit,giml,aux-stats,train-dcgan,public-images} [options]

Gradient inversion attacks (DLG, iDLG, Inverting Gradients, GradInversion, stepwise, GIAS/GIML)
as PyTorch Lightning modules.

subcommands:
  fit          run an attack: lightning-gi fit --config configs/idlg_lenet.yaml
               (lightning-gi fit --help lists every option)
  giml         meta-learn a generator from gradients (GIML), then use it as GIAS's prior:
               lightning-gi giml --config configs/giml/dcgan_photos.yaml
  aux-stats    auxiliary feature statistics of public images for the stepwise attack:
               lightning-gi aux-stats --model resnet34 --out checkpoints/resnet34_aux_stats.pt
  train-dcgan  train a DCGAN prior on the bundled public images:
               lightning-gi train-dcgan --dataset photographs
  public-images  labelled public images for label recovery (AutoLabels / CalibratedCounts public_path):
               lightning-gi public-images --dataset digits --image_size 32 --out public.pt
  (lightning-gi COMMAND --help lists each command's options)

options:
  -h, --help  show this help message and exit
  --version   print the version and exit
  --debug     on a bad input, show the full traceback instead of a one-line error

exit status: 0 finished, 2 bad input, 130 interrupted (Ctrl+C), 143 terminated (SIGTERM), 1 crashed.
"""


# subcommand -> (module, what it does); each module has ``main(argv, exit_on_error)`` taking the subcommand's flags
TOOLS: dict[str, tuple[str, str]] = {
    "giml": ("lightning_gi.tools.giml", "meta-learn a generator from gradients (GIML)"),
    "aux-stats": ("lightning_gi.tools.aux_stats", "auxiliary statistics for the stepwise attack"),
    "train-dcgan": ("lightning_gi.tools.train_dcgan", "train a DCGAN prior on the bundled public images"),
    "public-images": ("lightning_gi.tools.public_images", "labelled public images for label recovery"),
}
COMMANDS = ("fit", *TOOLS)


class ConfigError(ValueError):
    """A run configuration the CLI refuses (no step budget, a reused run directory, a foreign checkpoint)."""


class RunInterrupted(SystemExit):
    """The run was stopped by a signal before it finished (exit status 130 or 143)."""


# ---------------------------------------------------------------------------------------------- output
class _QuietLogLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET_LOG_LINES.search(record.getMessage().strip())


class _StdoutHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stdout`` (so that redirections made later are honoured)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # not setStream: it would flush the previous (possibly closed) stream
        super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except ValueError:  # a redirected stream that has been closed since
            pass


def quiet_known_warnings() -> None:
    """Silence warnings that do not apply to attacks (eval-mode victims, endless step streams)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def configure_output() -> None:
    """One stream for results: Lightning's info lines (the end-of-run summary included) go to stdout
    with the ``log_dir:`` line, minus hardware probes and tips; warnings and errors stay on stderr."""
    quiet_known_warnings()
    import pytorch_lightning  # noqa: F401  (its import adds the stderr handler that is replaced here)

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLogLines) for f in logger.filters):
            logger.addFilter(_QuietLogLines())
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler and getattr(handler, "stream", None) is sys.stderr:
                logger.removeHandler(handler)
        if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
            handler = _StdoutHandler()
            handler.addFilter(_QuietLogLines())
            handler.setLevel(logging.INFO)
            logger.addHandler(handler)
        logger.propagate = False
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning_fabric.utilities.seed", "lightning_fabric.utilities.distributed",
                 "pytorch_lightning.accelerators.cuda", "pytorch_lightning.utilities.model_summary"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLogLines) for f in logger.filters):
            logger.addFilter(_QuietLogLines())


# ---------------------------------------------------------------------------------------------- errors
def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during (depth first, each once)."""
    out: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        stack.extend(x for x in (e.__context__, e.__cause__) if x is not None)
    return out


def _raised_in_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    try:
        return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _is_bad_input(exc: BaseException) -> bool:
    """The project's own error types, and plain ValueError/TypeError/OSError raised by project code."""
    module = type(exc).__module__ or ""
    if module.startswith("lightning_gi") and isinstance(exc, Exception):
        return True
    return isinstance(exc, (ValueError, TypeError, OSError)) and _raised_in_project(exc)


_NOISE_LINE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|Given value:|"
    r"Expected a <class 'NoneType'>|Problem with given class_path|Parser key|Validation failed:|Key \")"
)


def _condense(message: str) -> str:
    """jsonargparse's nested multi-line report -> "key: the first real reason" on one line."""
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', message)
    reasons = []
    for line in message.splitlines():
        text = line.strip()
        if not text or _NOISE_LINE.match(text) or text.startswith(("- Expected a <class 'NoneType'>", "Given value")):
            continue
        text = re.sub(r"^- ", "", text)
        reasons.append(text)
    reason = reasons[0] if reasons else message.strip().splitlines()[0]
    key = ".".join(dict.fromkeys(k for k in keys if k))  # ordered, de-duplicated
    return f"{key}: {reason}" if key and key not in reason else reason


def describe_bad_input(exc: BaseException) -> Optional[str]:
    """One-sentence description of a bad-input error (None when ``exc`` is a crash, not a bad input)."""
    chain = _chain(exc)
    for e in chain:
        if _is_bad_input(e):
            msg = str(e).strip() or type(e).__name__
            if isinstance(e, KeyError) and e.args:
                msg = str(e.args[0])
            return " ".join(msg.split()) if len(msg.splitlines()) > 1 else msg
    try:
        from jsonargparse import ArgumentError
    except ImportError:  # pragma: no cover
        ArgumentError = ()  # type: ignore[assignment]
    for e in chain:
        if isinstance(e, ArgumentError) or "Does not validate against any of the Union subtypes" in str(e):
            return _condense(str(e))
    return None


# ---------------------------------------------------------------------------------------------- resume
def _flatten(prefix: str, value: object, out: dict[str, Any]) -> None:
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def _hparams_as_config(hparams: dict[str, Any]) -> dict[str, Any]:
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    if "_class_path" in hparams:
        return {"class_path": hparams.pop("_class_path"), "init_args": hparams}
    return {"init_args": hparams}


def check_resume_hparams(ckpt_path: str, model_config: Any) -> None:
    """Refuse a checkpoint whose ``hyper_parameters`` differ from the user's model config (naming the keys).

    LightningCLI would merge them into the config; a resumed run must use the config the user gave.
    """
    from .checkpoints import CorruptCheckpointError
    from .observation import ObservationError, read_torch_file

    try:
        ckpt = read_torch_file(ckpt_path, "checkpoint to resume from")
    except ObservationError as err:
        raise CorruptCheckpointError(str(err)) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CorruptCheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise CorruptCheckpointError(f"{ckpt_path}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict")
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    if not hparams:
        return
    ours: dict[str, Any] = {}
    _flatten("", model_config, ours)
    theirs: dict[str, Any] = {}
    _flatten("", _hparams_as_config(hparams), theirs)
    if "class_path" not in theirs:
        ours.pop("class_path", None)
    differ = sorted(k for k, v in theirs.items() if k not in ours or ours[k] != v)
    if differ:
        shown = ", ".join(k.removeprefix("init_args.") for k in differ[:8]) + (" ..." if len(differ) > 8 else "")
        raise ConfigError(
            f"the checkpoint {ckpt_path} was made with other model settings ({shown}); a resumed run uses "
            "your config, so resume only from a checkpoint of the same config"
        )


def run_dir_of_checkpoint(ckpt_path: str) -> Optional[Path]:
    """``<run dir>/checkpoints/x.ckpt`` -> ``<run dir>`` (None for a checkpoint stored elsewhere)."""
    p = Path(ckpt_path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else None


_RUN_OUTPUTS = ("reconstruction.pt", "metrics.json", "checkpoints", "reconstruction.png", "hparams.yaml", "metrics.csv")


# ---------------------------------------------------------------------------------------------- the CLI
def _is_checkpoint_class(class_path: Optional[str]) -> bool:
    """Whether a config's callback class_path names a ModelCheckpoint (sub)class."""
    if not class_path:
        return False
    import importlib

    from pytorch_lightning.callbacks import ModelCheckpoint

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "pytorch_lightning.callbacks"), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def _cli_class() -> type:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

    from .callbacks import DivergenceGuard, ReconstructionMonitor, ReconstructionReport
    from .callbacks.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint

    class SaveConfigAndHparams(SaveConfigCallback):
        """Saves config.yaml in the run directory and logs the flattened config as hparams."""

        def save_config(self, trainer, pl_module, stage) -> None:  # type: ignore[no-untyped-def]
            flat: dict[str, Any] = {}
            _flatten("", self.config.as_dict(), flat)
            for logger in trainer.loggers:
                logger.log_hyperparams(
                    {k: str(v) for k, v in flat.items() if not k.startswith("trainer.callbacks")}
                )

    class LightningGICLI(LightningCLI):
        """LightningCLI with the attack/victim base classes, the mandatory callbacks and input checks."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

        def _parse_ckpt_path(self) -> None:
            """Never merge a checkpoint's hyper_parameters into the config: compare and refuse."""
            if not self.config.get("subcommand"):
                return
            cfg = self.config[self.config.subcommand]
            ckpt_path = cfg.get("ckpt_path")
            if not ckpt_path:
                return
            if not Path(ckpt_path).is_file():
                from .checkpoints import MissingCheckpointError

                raise MissingCheckpointError(f"checkpoint to resume from not found: {ckpt_path}")
            check_resume_hparams(ckpt_path, cfg.get("model"))

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.config.subcommand]
            max_steps = cfg.trainer.get("max_steps")
            if max_steps is None or int(max_steps) < 1:
                raise ConfigError(
                    f"trainer.max_steps is {max_steps}: an attack needs a positive step budget "
                    "(set trainer.max_steps, e.g. 300)"
                )
            ckpt_path = cfg.get("ckpt_path")
            run_dir = run_dir_of_checkpoint(ckpt_path) if ckpt_path else None
            logger = cfg.trainer.get("logger")
            if run_dir is not None and logger is not None and hasattr(logger, "get") and logger.get("init_args") is not None:
                args = logger.init_args
                if "save_dir" in args and "version" in args:
                    # resume in the checkpoint's own run directory: <save_dir>/<name>/<version>
                    args.save_dir = str(run_dir.parent.parent)
                    if "name" in args:
                        args.name = run_dir.parent.name
                    args.version = run_dir.name
            self._resuming = bool(ckpt_path)
            self._config_lists_checkpoint = any(
                _is_checkpoint_class(getattr(c, "class_path", None)) for c in (cfg.trainer.get("callbacks") or [])
            )

        def before_fit(self) -> None:
            trainer = self.trainer
            callbacks = trainer.callbacks
            if not any(isinstance(c, ReconstructionReport) for c in callbacks):
                callbacks.append(ReconstructionReport())
            if not any(isinstance(c, ReconstructionMonitor) for c in callbacks):
                callbacks.append(ReconstructionMonitor())
            if not any(isinstance(c, DivergenceGuard) for c in callbacks):
                callbacks.append(DivergenceGuard())
            from pytorch_lightning.callbacks import RichProgressBar

            from .callbacks.progress import AttackProgressBar

            for i, c in enumerate(callbacks):  # Lightning's default rich bar would read "Epoch 0/-2"
                if type(c) is RichProgressBar:
                    callbacks[i] = AttackProgressBar()
            if trainer.checkpoint_callback is not None and not getattr(self, "_config_lists_checkpoint", False):
                # Lightning's default ModelCheckpoint only saves at epoch ends, which an attack never reaches
                for c in [c for c in callbacks if type(c) is ModelCheckpoint]:
                    callbacks.remove(c)
                period = max(1, min(100, int(trainer.max_steps) // 10))
                callbacks.append(PeriodicCheckpoint(every_n_train_steps=period))
            from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

            strategy = trainer.strategy
            if type(strategy.checkpoint_io) is TorchCheckpointIO:
                strategy.checkpoint_io = AtomicCheckpointIO()
            if not getattr(self, "_resuming", False) and all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK")):
                log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
                if log_dir and os.path.isdir(log_dir):
                    found = sorted(e for e in os.listdir(log_dir) if e in _RUN_OUTPUTS or e.startswith("events.out"))
                    if found:
                        raise ConfigError(
                            f"the run directory {log_dir} already holds outputs of another run ({', '.join(found[:4])}); "
                            "choose another trainer.logger.init_args.version, or resume that run with "
                            f"--ckpt_path {os.path.join(log_dir, 'checkpoints', 'last.ckpt')}"
                        )


        def after_fit(self) -> None:
            log_dir = self.trainer.log_dir  # a collective (broadcast) under multi-process strategies: every rank asks
            if self.trainer.is_global_zero:
                print(f"log_dir: {log_dir}", flush=True)

    return LightningGICLI, SaveConfigAndHparams


def run(args: Optional[list[str]] = None, exit_on_error: bool = True) -> Any:
    """Run the CLI programmatically (``run(["fit", "--config", ...])``) and return it (``.trainer``, ``.model``).

    Errors propagate as exceptions (bad arguments too when ``exit_on_error=False``); :func:`main` turns
    them into one-line messages and exit statuses.
    """
    configure_output()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .attacks.base import GradientInversionAttack
    from .victim.datamodule import VictimDataModule

    cli_class, save_config = _cli_class()
    parser_kwargs: dict[str, Any] = {}
    if not exit_on_error:
        parser_kwargs = {"exit_on_error": False, "fit": {"exit_on_error": False}}
    return cli_class(
        GradientInversionAttack,
        VictimDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=save_config,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs=parser_kwargs,
        args=args,
    )


def run_tool(name: str, argv: list[str], exit_on_error: bool = True) -> Any:
    """Run the subcommand ``name`` (a key of :data:`TOOLS`) with its own flags; returns what its ``main`` returns.

    ``exit_on_error=False``: a bad command line raises (one sentence, see :func:`describe_bad_input`)."""
    import importlib

    configure_output()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module = importlib.import_module(TOOLS[name][0])
    program = sys.argv[0]
    sys.argv[0] = f"lightning-gi {name}"  # LightningCLI names the program after argv[0] in usage lines
    try:
        return module.main(list(argv), exit_on_error=exit_on_error)
    finally:
        sys.argv[0] = program


def _finished(cli: Any) -> Optional[int]:
    """None when the run finished, else the exit status it deserves."""
    trainer = getattr(cli, "trainer", None)
    if trainer is None:
        return None
    if getattr(trainer, "received_sigterm", False):
        return EXIT_SIGTERM
    from pytorch_lightning.trainer.states import TrainerStatus

    if trainer.state.status == TrainerStatus.INTERRUPTED:
        return EXIT_SIGINT
    return None


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point (``lightning-gi``).

    Returns None when the run finished (exit 0); raises ``SystemExit(2)`` with a one-line message for a
    bad input, ``SystemExit(130/143)`` when interrupted by SIGINT/SIGTERM.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LIGHTNING_GI_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(_TOP_HELP)
        if not argv:
            raise SystemExit(EXIT_BAD_INPUT)
        return
    if argv[0] == "--version":
        from . import __version__

        print(f"lightning-gi {__version__}")
        return
    if argv[0].startswith("-") and argv[0] not in ("-c", "--config", "--print_config") or (
        not argv[0].startswith("-") and argv[0] not in COMMANDS
    ):
        sys.stderr.write(
            f"lightning-gi: error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
            "(see lightning-gi --help)\n"
        )
        raise SystemExit(EXIT_BAD_INPUT)
    try:
        cli = run_tool(argv[0], argv[1:], exit_on_error=debug) if argv[0] in TOOLS else run(argv, exit_on_error=debug)
    except SystemExit as exc:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exc, SIGTERMException):
            sys.stderr.write("lightning-gi: terminated (SIGTERM) before the run finished\n")
            raise RunInterrupted(EXIT_SIGTERM) from None
        if exc.code == 1 and _interrupted_by_keyboard(exc):
            raise RunInterrupted(EXIT_SIGINT) from None
        raise
    except KeyboardInterrupt:
        sys.stderr.write("lightning-gi: interrupted (Ctrl+C) before the run finished\n")
        raise RunInterrupted(EXIT_SIGINT) from None
    except Exception as exc:
        if debug:
            raise
        message = describe_bad_input(exc)
        if message is None:
            raise
        sys.stderr.write(f"lightning-gi: error: {message}\n(run again with --debug for the full traceback)\n")
        raise SystemExit(EXIT_BAD_INPUT) from None
    status = _finished(cli)
    if status is not None:
        sys.stderr.write(f"lightning-gi: the run was stopped (exit status {status}) before it finished\n")
        raise RunInterrupted(status)


def _interrupted_by_keyboard(exc: SystemExit) -> bool:
    """Lightning turns Ctrl+C into ``sys.exit(1)`` after a graceful shutdown."""
    return any(isinstance(e, KeyboardInterrupt) for e in _chain(exc))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
