"""The ``echonode`` command.

Each subcommand lives in ``echonode/commands/<name>.py`` and exposes
``register(subparsers, parents)``; modules must import lightly (no torch at import
time) so ``echonode serve`` and ``echonode --help`` stay fast.

Exit codes: 0 success, 1 failure while running, 2 usage error, 3 configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from echonode import audit
from echonode import __version__
from echonode.config import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

COMMAND_MODULES = (
    "echonode.commands.serve",     # serve
    "echonode.commands.status",    # status
    "echonode.commands.worker",    # worker
    "echonode.commands.models",    # models, embed
    "echonode.commands.analyze",   # analyze
    "echonode.commands.phantom",   # phantom
    "echonode.commands.train",     # train, eval, calibrate
    "echonode.commands.outbox",    # outbox
    "echonode.commands.demo",      # demo
    "echonode.commands.audit",     # audit
    "echonode.commands.priors",    # priors backfill
    "echonode.commands.fsck",      # fsck
    "echonode.commands.retention", # retention
)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings for a parsed command line (``--config`` plus the environment)."""
    settings = load_settings(getattr(args, "config", None))
    audit.configure(settings)  # who reports audit events (issue 16)
    return settings


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs dataset contents at DEBUG; keep it at WARNING so no PHI reaches logs.
    # botocore at DEBUG logs every request (the Authorization header with the access key ID,
    # object URLs with UIDs) and response bodies (bucket listings).
    for name in ("pynetdicom", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: nested sub-commands (outbox list, models import …) repeat these options; a
    # None default there would overwrite a --config given before the action
    common.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML configuration file (default: $ECHONODE_CONFIG, else built-in defaults)")
    parser = argparse.ArgumentParser(
        prog="echonode",
        description="DICOM node that brings the EchoCLIP echocardiography model into the PACS workflow.",
    )
    parser.add_argument("--version", action="version", version=f"echonode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        mod.register(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        rc = args.func(args)
        audit.flush_at_exit()  # one-shot commands send their audit events
    except ConfigError as exc:
        print(f"echonode: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from echonode.store.db import NotMigrated   # read-only commands never migrate

        if isinstance(exc, NotMigrated):
            print(f"echonode {args.command}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    return EXIT_OK if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
