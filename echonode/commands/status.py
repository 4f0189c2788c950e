"""``echonode status``: what arrived, per study, and the analysis jobs by state."""

from __future__ import annotations

import json
import sys


def register(sub, parents):
    p = sub.add_parser("status", parents=parents, help="counts, per-study state and jobs",
                       description="Show what the node holds: counts, per-study state, analysis jobs.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=int, default=200, help="list at most this many studies (newest first)")
    p.set_defaults(func=run)


def collect_status(settings, *, study_limit: int = 200) -> dict:
    """The status dict (the pipeline adds queue depth, recent results). Read-only: never
    migrates; raises :class:`echonode.store.db.NotMigrated` when the database is not ready."""
    from echonode.store import db
    from echonode.store.status import collect_status as collect_store

    db.require_migrated(settings.db_url)
    engine = db.make_engine(settings.db_url, create=False)
    try:
        with db.session_factory(engine)() as session:
            out = collect_store(session, study_limit=study_limit)
            from echonode.pipeline.statusinfo import pipeline_status
            out.update(pipeline_status(settings, session))
    finally:
        engine.dispose()
    out["data_dir"] = str(settings.data_path)
    from echonode.storage import describe
    out["storage"] = describe(settings)
    out["open_node"] = settings.node.is_open
    return out


def run(args) -> int:
    from echonode.cli import settings_from_args

    from echonode.store.db import NotMigrated

    settings = settings_from_args(args)
    try:
        status = collect_status(settings, study_limit=args.limit)
    except NotMigrated as exc:
        print(f"echonode status: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"echonode status: cannot read the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=None, sort_keys=True))
        return 0
    if status.get("open_node"):
        from echonode.config import OPEN_NODE_WARNING
        print(OPEN_NODE_WARNING)
    print(f"storage: {status['storage']}")
    print(f"patients {status['patients']}  studies {status['study_count']}  series {status['series']}  "
          f"instances {status['instances']}")
    print("jobs: " + "  ".join(f"{k} {v}" for k, v in status["jobs"].items()))
    from echonode.pipeline.statusinfo import format_pipeline
    for line in format_pipeline(status):
        print(line)
    if status["studies"]:
        print(f"{'study instance uid':64}  {'instances':>9}  {'clips':>5}  state")
        for s in status["studies"]:
            print(f"{s['study_instance_uid']:64}  {s['instances']:>9}  {s['clips_to_analyse']:>5}  {s['state']}")
    return 0
