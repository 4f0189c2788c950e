"""Cost of the audit trail.

Prints JSON lines:

* ``record``: ``audit.record`` of an *instance stored* event (build the A.5 message, one SQL
  commit) per event, against the reference measured in the same run, a bare one-row
  INSERT + COMMIT in the same database (``ratio_vs_insert``); this is what a C-STORE pays;
* ``send``: the syslog sender draining N waiting events over TCP (octet counting) to a local
  sink that counts records (``msgs_per_s``), against the rate of recording them
  (``ratio_vs_record`` > 1: the sender keeps up with the events);
* ``validate``: lxml RELAX NG validation per message (test-time cost, not paid at run time).

Usage::

    python3 bench/audit.py [--events 300] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _TcpSink:
    """Counts octet-counted syslog records on a local port (measures our sender, not a repository)."""

    def __init__(self):
        import socket
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.records = 0

    def _run(self):
        conn, _ = self.srv.accept()
        buf = b""
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            buf += data
            while b" " in buf[:12]:
                n, _, rest = buf.partition(b" ")
                if len(rest) < int(n):
                    break
                buf = rest[int(n):]
                self.records += 1
        conn.close()

    def start(self):
        import threading
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.thread.join(10)
        self.srv.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300)
    ap.add_argument("--database-url", default="")
    args = ap.parse_args()

    from sqlalchemy import text

    from echonode import audit
    from echonode.audit.schema import errors
    from echonode.config import load_settings
    from echonode.store import db

    work = Path(tempfile.mkdtemp(prefix="echonode-bench-audit-"))
    over = {"data_dir": str(work / "data")}
    if args.database_url:
        over["database_url"] = args.database_url
    settings = load_settings(env={}, overrides=over)
    settings.data_path.mkdir(parents=True)
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    sf = db.session_factory(engine)
    n = args.events
    res = NS(status=0, reason="stored", sop_instance_uid="1.2.826.0.1.3680043.8.498.1.1",
             study_instance_uid="1.2.826.0.1.3680043.8.498.1", path=None, quarantine=None, replaced=False,
             duplicate=False)

    with sf() as s:
        s.execute(text("CREATE TABLE bench_ref (id INTEGER PRIMARY KEY, v TEXT)"))
        s.commit()
    t = time.perf_counter()
    for i in range(n):
        with sf() as s:
            s.execute(text("INSERT INTO bench_ref (v) VALUES (:v)"), {"v": "x" * 1200})
            s.commit()
    ref = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        audit.record(sf, audit.instance_received(res, calling_ae="CART", peer="127.0.0.1:4000",
                                                 called_ae="ECHONODE", sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1"))
    rec = (time.perf_counter() - t) / n
    print(json.dumps({"bench": "record", "events": n, "db": engine.dialect.name, "ms_per_event": round(rec * 1e3, 3),
                      "ref_insert_ms": round(ref * 1e3, 3), "ratio_vs_insert": round(rec / ref, 2)}))

    sink = _TcpSink().start()
    s2 = load_settings(env={}, overrides={**over, "audit": {"url": f"tcp://127.0.0.1:{sink.port}"}})
    t = time.perf_counter()
    sent = audit.flush(s2, sf, engine)
    dt_send = time.perf_counter() - t
    sink.stop()
    print(json.dumps({"bench": "send", "transport": "tcp (octet counting, local sink)", "events": sent,
                      "received": sink.records, "msgs_per_s": round(sent / dt_send, 1),
                      "ratio_vs_record": round((sent / dt_send) * rec, 2)}))

    with sf() as s:
        from echonode.store import audit as store
        msgs = [r.message for r in store.query(s, limit=n)]
    t = time.perf_counter()
    bad = sum(1 for m in msgs if errors(m))
    print(json.dumps({"bench": "validate", "messages": len(msgs), "invalid": bad,
                      "ms_per_message": round((time.perf_counter() - t) / max(1, len(msgs)) * 1e3, 3)}))
    engine.dispose()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
