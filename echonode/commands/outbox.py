"""``echonode outbox [list|retry|purge|send]``: the queue of results waiting for the PACS."""

from __future__ import annotations

import json
import sys

STATE_CHOICES = ("pending", "sending", "committing", "delivered", "dead")


def register(sub, parents):
    p = sub.add_parser("outbox", parents=parents, help="list, retry, purge or send results waiting for the PACS",
                       description="The outbox holds one row per result object and destination. "
                                   "Rows become 'dead' once failing for delivery.retry_for_s (a day by "
                                   "default), or after delivery.max_attempts attempts when that is set.")
    osub = p.add_subparsers(dest="outbox_command", metavar="ACTION")

    lp = osub.add_parser("list", parents=parents, help="list outbox rows (newest first)")
    lp.add_argument("--state", action="append", choices=STATE_CHOICES, help="only rows in this state (repeatable)")
    lp.add_argument("--study", metavar="UID", help="only rows of this Study Instance UID")
    lp.add_argument("--limit", type=int, default=200)
    lp.add_argument("--json", action="store_true", help="print JSON lines")
    lp.set_defaults(func=run_list)

    rp = osub.add_parser("retry", parents=parents,
                         help="make dead rows (or the given ids) due now with a fresh attempt budget")
    rp.add_argument("--id", type=int, action="append", dest="ids", help="row id (repeatable)")
    rp.add_argument("--state", action="append", choices=("dead", "pending"),
                    help="states to retry (default: dead)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=run_retry)

    pp = osub.add_parser("purge", parents=parents, help="delete delivered (or given-state) rows")
    pp.add_argument("--state", action="append", choices=("delivered", "dead"),
                    help="states to delete (default: delivered)")
    pp.add_argument("--older-than-days", type=float, default=0.0, help="only rows last updated before this")
    pp.add_argument("--id", type=int, action="append", dest="ids", help="row id (repeatable)")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=run_purge)

    sp = osub.add_parser("send", parents=parents, help="deliver due rows now (once)")
    sp.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="listen for storage commitment reports on node.port for up to S seconds")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=run_send)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _session(args):
    from echonode.cli import settings_from_args
    from echonode.store import db

    settings = settings_from_args(args)
    db.require_migrated(settings.db_url)      # only serve and worker migrate (cli says NotMigrated)
    engine = db.make_engine(settings.db_url, create=False)
    return settings, engine, db.session_factory(engine)


def run_list(args) -> int:
    from echonode.store import outbox as ob

    _, engine, sf = _session(args)
    try:
        with sf() as session:
            rows = ob.list_rows(session, states=args.state, study_uid=args.study, limit=args.limit)
            counts = ob.counts(session)
            data = [r.as_dict() for r in rows]
    finally:
        engine.dispose()
    if args.json:
        for d in data:
            print(json.dumps(d, sort_keys=True))
        return 0
    print("outbox: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    if data:
        print(f"{'id':>6}  {'state':10}  {'kind':4}  {'dest':12}  {'tries':>5}  {'status':6}  sop instance uid / last error")
        for d in data:
            print(f"{d['id']:>6}  {d['state']:10}  {d['kind'] or '-':4}  {d['destination'][:12]:12}  "
                  f"{d['attempts']:>5}  {d['last_status'] or '-':6}  {d['sop_instance_uid']}")
            if d["last_error"] and d["state"] != "delivered":
                print(f"{'':>6}  {d['last_error']}")
    return 0


def run_retry(args) -> int:
    from echonode.store import outbox as ob

    _, engine, sf = _session(args)
    try:
        with sf() as session:
            n = ob.retry(session, ids=args.ids, states=args.state or ("dead",))
    finally:
        engine.dispose()
    print(json.dumps({"retried": n}) if args.json else f"{n} row(s) due for delivery again")
    return 0


def run_purge(args) -> int:
    from echonode.store import outbox as ob

    _, engine, sf = _session(args)
    try:
        with sf() as session:
            n = ob.purge(session, states=args.state or ("delivered",),
                         older_than_s=args.older_than_days * 86400.0, ids=args.ids)
    finally:
        engine.dispose()
    print(json.dumps({"purged": n}) if args.json else f"{n} row(s) deleted")
    return 0


def run_send(args) -> int:
    import time

    from echonode.dicom import scu
    from echonode.store import outbox as ob

    settings, engine, sf = _session(args)
    if not settings.delivery.destinations:
        print("echonode outbox send: no destinations configured (delivery.destinations)", file=sys.stderr)
        engine.dispose()
        return 1
    listener = None
    try:
        if args.wait > 0 and any(d.storage_commitment for d in settings.delivery.destinations):
            try:
                listener = scu.CommitmentListener(settings, sf, host=settings.node.host).start()
            except OSError as exc:
                print(f"echonode outbox send: cannot listen on {settings.node.host}:{settings.node.port} for "
                      f"commitment reports ({exc.strerror or exc}); if `echonode serve` runs, it receives "
                      "them itself: run without --wait", file=sys.stderr)
                return 1
        summary = scu.deliver_pending(settings, sf)
        deadline = time.monotonic() + args.wait
        while listener is not None and time.monotonic() < deadline:
            with sf() as session:
                if ob.counts(session)["committing"] == 0:
                    break
            time.sleep(0.2)
        with sf() as session:
            counts = ob.counts(session)
    finally:
        if listener is not None:
            listener.stop()
        engine.dispose()
    out = {"summary": summary.as_dict(), "outbox": counts}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        s = summary
        print(f"claimed {s.claimed}: delivered {s.delivered}, awaiting commitment {s.committing}, "
              f"retrying {s.retrying}, dead {s.dead}")
        print("outbox: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
        for e in s.errors:
            print(f"error: {e}", file=sys.stderr)
    return 0 if not summary.errors and summary.dead == 0 else 1
