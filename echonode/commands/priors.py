"""``echonode priors backfill``: embed a site's earlier echo studies from the PACS ahead of time.

Thin: parses the options, loads the model, calls :func:`echonode.priors.backfill`, prints
one JSON summary on stdout and a progress bar (tqdm) on stderr. Resumes after a stop:
what is done is in SQL (the priors ledger).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import sys
import threading


def register(sub, parents):
    p = sub.add_parser("priors", parents=parents, help="earlier studies from the PACS (backfill)",
                       description="Priors from the configured [[priors.sources]] (docs/priors.md).")
    psub = p.add_subparsers(dest="priors_command", metavar="ACTION")
    bp = psub.add_parser("backfill", parents=parents, help="embed the site's US studies since DATE, once per weights")
    bp.add_argument("--since", required=True, metavar="DATE", help="YYYYMMDD or YYYY-MM-DD (StudyDate from)")
    bp.add_argument("--limit", type=int, default=None, metavar="N", help="at most N studies this run")
    bp.add_argument("--rate", default=None, metavar="N/min", help="start at most N study retrieves per minute")
    bp.add_argument("--window", default="", metavar="HH:MM-HH:MM",
                    help="only retrieve within this local time window (may wrap midnight), e.g. 19:00-06:00")
    bp.add_argument("--concurrency", type=int, default=None, help="concurrent retrieves (default priors.backfill_concurrency)")
    bp.add_argument("--no-progress", action="store_true", help="no progress bar")
    bp.set_defaults(func=run_backfill)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _date(text: str) -> str:
    t = text.replace("-", "")
    try:
        dt.datetime.strptime(t, "%Y%m%d")
    except ValueError:
        raise SystemExit(f"echonode priors backfill: --since: expected a date YYYYMMDD, got {text!r}")
    return t


def _rate(text):
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*min)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise SystemExit(f"echonode priors backfill: --rate: expected N/min, got {text!r}")
    return float(m.group(1))


def run_backfill(args) -> int:
    from echonode.cli import settings_from_args, setup_logging
    from echonode.priors import backfill, load_interpreter, parse_window
    from echonode.store import db

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    since, rate = _date(args.since), _rate(args.rate)
    try:
        window = parse_window(args.window)
    except ValueError as exc:
        print(f"echonode priors backfill: {exc}", file=sys.stderr)
        return 2
    if not settings.priors.sources:
        print("echonode priors backfill: no [[priors.sources]] configured", file=sys.stderr)
        return 2
    db.migrate(settings.db_url)
    sessions = db.session_factory(db.get_engine(settings.db_url))
    try:
        interpreter = load_interpreter(settings)
    except RuntimeError as exc:
        print(f"echonode priors backfill: {exc}", file=sys.stderr)
        return 4
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="study", file=sys.stderr, desc="priors backfill")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        stats = backfill(settings, sessions, interpreter, since=since, limit=args.limit, rate_per_min=rate,
                         window=window, progress=progress, stop=stop, concurrency=args.concurrency)
    except KeyboardInterrupt:
        stop.set()
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(stats.as_dict()))
    return 0 if stats.failed == 0 else 1
