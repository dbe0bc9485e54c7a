"""``lightning-gi giml``: meta-learn a generator from gradients (GIML), a LightningCLI run.

GIML is a LightningModule over many observations (:class:`~lightning_gi.attacks.GIML` with the
:class:`~lightning_gi.victim.GradientTasks` DataModule), not a ``lightning-gi fit`` attack, so it has its own
LightningCLI: the options are those of LightningCLI (``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``,
``--print_config``); the ``fit`` subcommand is implied (accepted too)::

    lightning-gi giml --config configs/giml/dcgan_photos.yaml
"""
from __future__ import annotations

import os
from typing import Any, Optional


def main(argv: Optional[list[str]] = None, exit_on_error: bool = True) -> Any:
    """Run GIML's LightningCLI on ``argv`` (default ``sys.argv[1:]``) and return it.

    ``exit_on_error=False``: a bad command line or config raises (``lightning-gi`` prints one sentence and
    exits 2) instead of printing the usage.
    """
    import sys

    from pytorch_lightning.cli import LightningCLI

    from ..attacks.giml import GIML
    from ..cli import configure_output
    from ..victim.tasks import GradientTasks

    configure_output()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "fit":
        args = ["fit", *args]
    parser_kwargs: dict[str, Any] = {} if exit_on_error else {"exit_on_error": False, "fit": {"exit_on_error": False}}
    return LightningCLI(GIML, GradientTasks, auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
                        seed_everything_default=0, parser_kwargs=parser_kwargs, args=args)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main as cli_main

    cli_main(["giml", *__import__("sys").argv[1:]])
