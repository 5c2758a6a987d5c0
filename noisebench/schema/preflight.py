"""Check the command line's config before Hydra starts a run: a bad value ends the launch with one line and exit
code 2, before any import of torch, any model or data work, and before Hydra creates the run folder.

Composes exactly what Hydra will (same conf dir, overrides, and every job of a ``-m`` sweep), then applies the
schemas' rules (``noisebench.schema.rules``). ``HYDRA_FULL_ERROR=1`` keeps the traceback for developers.
The command line is read with Hydra's own parser and basic sweeper (``hydra._internal``, stable within the pinned
hydra-core 1.3), so a sweep splits here as it will in the launch.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from noisebench.schema import register
from noisebench.schema.rules import ConfigError, check, omegaconf_message

EXIT_USAGE = 2  # as argparse: the command line is wrong, nothing ran
CONFIG_ERRORS = (ConfigError, HydraException, OmegaConfBaseException)


def preflight(config_dir: str, config_name: str, argv: Optional[Sequence[str]] = None,
              prog: str = "noisebench") -> None:
    """Compose and check the config(s) ``argv`` asks for; on a bad value print one line and exit 2.

    Args:
        config_dir: the config tree Hydra reads: an absolute folder or ``pkg://package.path``.
        config_name: the primary config (``config`` or ``eval_only``).
        argv: the command line after the program name; default ``sys.argv[1:]``.
    """
    try:
        jobs = _jobs(argv if argv is not None else sys.argv[1:])
        if jobs:
            with _config_tree(config_dir):
                for overrides in jobs:
                    check(compose(config_name=config_name, overrides=overrides))
    except CONFIG_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {explain(err)}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    finally:
        GlobalHydra.instance().clear()  # leave Hydra as found: the real launch initialises it again


def _jobs(argv: Sequence[str]) -> list[list[str]]:
    """The override lists of the jobs Hydra would run (one, or each of a basic ``-m`` sweep); none for --help."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))  # argparse exits 2 on a bad flag, as Hydra would
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun \
            or args.config_path or args.config_dir or args.config_name:
        return []  # Hydra answers these itself, or reads another config tree
    if not args.multirun:
        return [list(args.overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(args.overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _config_tree(config_dir: str):
    """Hydra initialised on the tree the launch reads: an absolute folder or ``pkg://package.path``."""
    from hydra import initialize_config_dir, initialize_config_module

    register()
    GlobalHydra.instance().clear()
    if config_dir.startswith("pkg://"):
        return initialize_config_module(config_module=config_dir[len("pkg://"):], version_base="1.3")
    return initialize_config_dir(config_dir=config_dir, version_base="1.3")


def explain(err: BaseException) -> str:
    """One line naming the key and what is valid, from a rule, Hydra or OmegaConf error."""
    cause = err if isinstance(err, OmegaConfBaseException) else (err.__cause__ or err.__context__)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return omegaconf_message(cause)
    text = str(err).split("Config search path:")[0]  # a missing option: keep the options Hydra lists, not its paths
    return re.sub(r"\s*\n\s*", " ", text.strip())  # Hydra's own message, on one line
