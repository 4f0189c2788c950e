"""``echonode audit``: read, export and prune the audit trail (issue 16, PS3.15 A.5).

* ``audit list``   PHI-free listing (event, time, AE titles, study UID, patient key, outcome);
* ``audit export`` the full A.5 XML messages (they carry patient identifiers) into a file
  created with mode 0640;
* ``audit retention --older-than DAYS`` deletes old events that reached the repository.

Reading and deleting the trail are themselves audit events (110101 Audit Log Used).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys

from echonode import audit


def register(sub, parents):
    p = sub.add_parser("audit", parents=parents, help="the audit trail: list, export, retention",
                       description="The node's audit trail (DICOM PS3.15 A.5 audit messages kept in SQL).")
    asub = p.add_subparsers(dest="audit_cmd", metavar="ACTION")

    def filters(sp):
        sp.add_argument("--since", metavar="T", help="ISO date/time (UTC) or a span back from now: 30m, 24h, 7d")
        sp.add_argument("--until", metavar="T", help="ISO date/time (UTC) or a span back from now")
        sp.add_argument("--study", metavar="UID", help="Study Instance UID")
        sp.add_argument("--patient-key", metavar="K", help="the node's patient key (as in `echonode status`)")
        sp.add_argument("--event", metavar="E", action="append", default=[],
                        help="event name (instance-stored, association-rejected, ...) or DICOM EventID "
                             "(110104); repeatable")
        sp.add_argument("--limit", type=int, default=1000)

    sp = asub.add_parser("list", parents=parents, help="list audit events (no patient identifiers)")
    filters(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=run_list)

    sp = asub.add_parser("export", parents=parents,
                         help="write the full audit messages (with patient identifiers) to a file (mode 0640)")
    filters(sp)
    sp.add_argument("--out", required=True, metavar="FILE", help="output file (must not exist)")
    sp.add_argument("--format", choices=("xml", "jsonl"), default="xml",
                    help="xml: one AuditMessage per line; jsonl: index fields + message")
    sp.set_defaults(func=run_export)

    sp = asub.add_parser("retention", parents=parents, help="delete events older than DAYS (audited)")
    sp.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    sp.add_argument("--include-unsent", action="store_true",
                    help="also delete events the audit repository has not received")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=run_retention)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


_SPAN = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_time(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """Naive UTC datetime from ISO text or a span back from now ("24h", "7d")."""
    if not text:
        return None
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    m = _SPAN.match(text.strip())
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - dt.timedelta(seconds=float(m.group(1)) * mult)
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"echonode audit: cannot read time {text!r} (ISO date/time or 30m, 24h, 7d)") from None
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t


def _open(args):
    from echonode.cli import settings_from_args
    from echonode.store import db

    settings = settings_from_args(args)
    settings.data_path.mkdir(parents=True, exist_ok=True)
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    return settings, engine, db.session_factory(engine)


def _query(sf, args):
    from echonode.store import audit as store
    with sf() as s:
        rows = store.query(s, since=parse_time(args.since), until=parse_time(args.until), study_uid=args.study or "",
                           patient_key=args.patient_key or "", events=args.event, limit=args.limit)
        sent = store.sent_ids(s) if rows else set()
    return rows, sent


def _describe(args) -> str:
    parts = [f"--{k.replace('_', '-')} {v}" for k, v in (("since", args.since), ("until", args.until),
                                                        ("study", args.study), ("patient_key", args.patient_key))
             if v]
    parts += [f"--event {e}" for e in args.event]
    return " ".join(parts)


def run_list(args) -> int:
    settings, engine, sf = _open(args)
    try:
        rows, sent = _query(sf, args)
        audit.record(sf, audit.audit_log_used("R", count=len(rows), query=("list " + _describe(args)).strip()))
    finally:
        engine.dispose()
    if args.json:
        for r in rows:
            d = r.as_dict()
            d["sent"] = r.id in sent
            print(json.dumps(d, sort_keys=True))
        return 0
    print(f"{len(rows)} audit event(s)" + ("" if settings.audit.url else " (no audit.url: kept in SQL only)"))
    for r in rows:
        d = r.as_dict()
        s = d["summary"]
        who = s.get("calling_ae") or s.get("destination") or s.get("process") or s.get("kind") or ""
        print(f"{d['id']:>7}  {d['occurred_at'][:23]}  {d['event']:<26} {d['event_id']}/{d['action']}/"
              f"{d['outcome']:<2} {'sent' if r.id in sent else 'wait'}  {who[:16]:<16} "
              f"{d['study_instance_uid'] or '-'}  {(d['patient_key'] or '-')[:16]}")
    return 0


def run_export(args) -> int:
    out = args.out
    if os.path.exists(out):
        print(f"echonode audit export: {out} exists; not overwritten", file=sys.stderr)
        return 1
    settings, engine, sf = _open(args)
    try:
        rows, sent = _query(sf, args)
        # the file holds patient identifiers: owner read/write, group read, nobody else
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.fchmod(fd, 0o640)  # independent of the umask
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in rows:
                if args.format == "xml":
                    fh.write(r.message + "\n")
                else:
                    d = r.as_dict(with_message=True)
                    d["sent"] = r.id in sent
                    fh.write(json.dumps(d, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        audit.record(sf, audit.audit_log_used("R", count=len(rows), query=("export " + _describe(args)).strip(),
                                              target=os.path.abspath(out)))
    finally:
        engine.dispose()
    print(f"{len(rows)} audit message(s) written to {out} (mode 0640; it contains patient identifiers)")
    return 0


def run_retention(args) -> int:
    from echonode.store import audit as store

    if args.older_than < 0:
        print("echonode audit retention: --older-than must be >= 0 days", file=sys.stderr)
        return 2
    settings, engine, sf = _open(args)
    cutoff = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=args.older_than)
    include_unsent = args.include_unsent or not settings.audit.url
    try:
        with sf() as s:
            n = store.retention(s, cutoff, include_unsent=include_unsent)
        audit.record(sf, audit.audit_log_used("D", count=n, query=f"retention --older-than {args.older_than:g} days"
                                              + (" (unsent included)" if include_unsent else "")))
    finally:
        engine.dispose()
    print(json.dumps({"deleted": n, "before": cutoff.isoformat() + "Z"}) if args.json
          else f"{n} audit event(s) older than {cutoff.isoformat(timespec='seconds')}Z deleted")
    return 0
