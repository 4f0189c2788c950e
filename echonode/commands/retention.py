"""``echonode retention``: remove what the node keeps only for safety, explicitly.

The only way anything acknowledged is deleted. Dry run unless ``--apply``; every file
removed is logged. ``--instance-history-older-than DAYS``: versions of instances that
stopped being current (or were never current: ``node.on_conflict = "keep-first"``) and
whose history row is older than DAYS; the current version of every instance stays.
"""

from __future__ import annotations

import json
import logging
import sys

LOG = logging.getLogger("echonode.retention")


def register(sub, parents):
    p = sub.add_parser("retention", parents=parents, help="remove old non-current instance versions (dry run by default)",
                       description="Remove non-current versions of instances recorded more than DAYS ago "
                                   "(files and history rows). Prints what it would remove unless --apply.")
    p.add_argument("--instance-history-older-than", type=float, required=True, metavar="DAYS",
                   dest="days", help="versions recorded more than this many days ago")
    p.add_argument("--apply", action="store_true", help="really remove (default: dry run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import datetime as dt

    from echonode.cli import settings_from_args, setup_logging
    from echonode.storage import open_storage
    from echonode.store import db
    from echonode.store.index import expire_instance_history
    from echonode.store.models import utcnow

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    if not args.days >= 0:
        print("echonode retention: --instance-history-older-than must be >= 0", file=sys.stderr)
        return 2
    cutoff = utcnow() - dt.timedelta(days=args.days)
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    try:
        rows, paths = expire_instance_history(db.session_factory(engine), cutoff, apply=args.apply)
    finally:
        engine.dispose()
    removed, freed, failed = [], 0, []
    store = open_storage(settings)
    for rel in paths:
        try:
            size = store.size(rel) or 0
            if args.apply:
                store.delete(rel)
        except ValueError:  # not a key of the store: never touched
            failed.append(rel)
            continue
        except OSError as exc:
            LOG.error("retention: could not remove %s: %s", rel, exc.strerror or exc)
            failed.append(rel)
            continue
        if args.apply:
            LOG.info("retention: removed non-current instance version %s (%d bytes)", rel, size)
        removed.append(rel)
        freed += size
    if args.apply:
        LOG.info("retention: %d history rows deleted, %d files removed, %d bytes freed", rows, len(removed), freed)
    out = {"apply": args.apply, "older_than_days": args.days, "history_rows": rows, "files": removed,
           "bytes": freed, "failed": failed}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        verb = "removed" if args.apply else "would remove"
        print(f"{verb} {len(removed)} files ({freed} bytes) and {rows} history rows")
        for rel in removed:
            print(f"  {rel}")
    return 1 if failed else 0
