"""``echonode fsck``: does the index agree with the files? (read-only unless ``--repair``)

Exit 0: nothing wrong (or everything found was repaired); 1: problems remain (rows
without a file, size/sha256 mismatches, files not indexed, or an error).
See ``docs/durability.md``.
"""

from __future__ import annotations

import json
import sys

SHARED_MIN_AGE_S = 600.0


def register(sub, parents):
    p = sub.add_parser("fsck", parents=parents, help="check that the index and the stored files agree",
                       description="Compare instances/ with the index. Read-only unless --repair: then files "
                                   "without a row are indexed (or moved to orphans/), temp files removed. "
                                   "Rows without a file and checksum mismatches are reported.")
    p.add_argument("--repair", action="store_true", help="index or move files without a row, remove temp files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="compare sizes only, do not hash every file")
    p.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                   help="leave files younger than this alone (default: 0, or 600 while echonode serve "
                        "runs on this data directory or with object storage, which every receiver shares)")
    p.set_defaults(func=run)


def run(args) -> int:
    from echonode.cli import settings_from_args, setup_logging
    from echonode.commands.serve import quiet_libraries
    from echonode.dicom.reconcile import reconcile, serve_running
    from echonode.store import db

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    quiet_libraries()
    running = serve_running(settings.data_path)
    shared = bool(settings.storage.url)   # object storage: other receivers may be placing objects now
    min_age = args.min_age if args.min_age is not None else (600.0 if running or shared else 0.0)
    if shared and args.repair and min_age < SHARED_MIN_AGE_S:
        # no lock spans the receivers: a younger object may be another node's, between its
        # PUT and its COMMIT, and moving it would take an acknowledged instance from its row
        print(f"echonode fsck: with object storage --repair leaves objects younger than {SHARED_MIN_AGE_S:.0f} s "
              f"alone (other receivers may be placing them); --min-age {min_age:g} refused", file=sys.stderr)
        return 2
    spool = None
    try:
        db.migrate(settings.db_url)
        engine = db.make_engine(settings.db_url)
        sessions = db.session_factory(engine)
        try:
            if args.repair:
                from echonode.dicom.spool import Spool
                spool = Spool(settings, sessions, clean_incoming=False)
            rep = reconcile(settings, sessions, spool, repair=args.repair, verify=not args.quick,
                            min_age_s=min_age)
        finally:
            if spool is not None:
                spool.close()
            engine.dispose()
    except Exception as exc:
        print(f"echonode fsck: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out = rep.as_dict()
        out["serve_running"] = running
        print(json.dumps(out, sort_keys=True))
    else:
        print(("repair: " if args.repair else "check: ") + rep.summary())
        for label, items in (("indexed now", rep.indexed), ("without a row", rep.unindexed),
                             ("missing file", rep.missing), ("size mismatch", rep.size_mismatch),
                             ("sha256 mismatch", rep.sha_mismatch)):
            for item in items:
                print(f"  {label}: {item}")
        for o in rep.orphaned:
            print(f"  moved to {o['orphan']}: {o['path']} ({o['reason']})")
        for o in rep.index_failed:
            print(f"  not indexed: {o['path']} ({o['reason']})")
    return 0 if rep.problems() == 0 else 1
