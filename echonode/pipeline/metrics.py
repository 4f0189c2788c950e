"""Prometheus metrics (plain-text exposition format 0.0.4) and ``/healthz``.

Two kinds of numbers:

* counters of the node process: associations and C-STORE outcomes (read from the running
  SCP), dispatched jobs and delivery outcomes (incremented through :data:`REGISTRY`);
* gauges read from SQL at scrape time (jobs by state, job durations, stored instances
  and bytes, outbox rows by state), so they are right whichever process did the work
  (the node, an embedded worker, or GPU workers on other machines).

``serve_metrics(settings, stop)`` runs the HTTP endpoint on ``metrics.host:metrics.port``
(loopback by default): ``GET /metrics`` and ``GET /healthz`` (JSON; 200 when the database
answers and delivery is healthy, else 503 with the reasons: a dead outbox row, or an
undelivered object older than ``delivery.alert_after_s``).
"""

from __future__ import annotations

import logging
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional

log = logging.getLogger("echonode.metrics")

# job duration histogram buckets (seconds)
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Registry:
    """Thread-safe counters: ``inc(name, value=1, **labels)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._help: dict[str, str] = {}

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + float(value)

    def get(self, name: str, **labels: str) -> float:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            return self._counters.get(name, {}).get(key, 0.0)

    def render(self) -> list[str]:
        lines: list[str] = []
        with self._lock:
            items = {n: dict(s) for n, s in self._counters.items()}
        for name in sorted(set(items) | set(self._help)):
            lines.append(f"# HELP {name} {self._help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for key, val in sorted(items.get(name, {}).items()):
                lines.append(f"{name}{_labels(dict(key))} {_num(val)}")
        return lines


REGISTRY = Registry()
REGISTRY.describe("echonode_jobs_dispatched_total", "Analysis jobs sent to the queue by this node process")
REGISTRY.describe("echonode_deliveries_total", "Delivery attempts of result objects, by outcome")


def scp_lines(scp) -> list[str]:
    """Counters of the running SCP (``EchoSCP.totals``): associations and C-STORE outcomes."""
    t = dict(getattr(scp, "totals", None) or {})
    lines = ["# HELP echonode_associations_total DICOM associations since the node started, by result",
             "# TYPE echonode_associations_total counter",
             f'echonode_associations_total{{result="accepted"}} {int(t.get("associations", 0))}',
             f'echonode_associations_total{{result="rejected"}} {int(t.get("rejected", 0))}',
             "# HELP echonode_instances_received_total C-STORE requests answered since the node started, by outcome",
             "# TYPE echonode_instances_received_total counter",
             f'echonode_instances_received_total{{outcome="stored"}} {int(t.get("stored", 0))}',
             f'echonode_instances_received_total{{outcome="failed"}} {int(t.get("failures", 0))}']
    return lines


def _gauge(lines: list[str], name: str, help_text: str, values: Iterable[tuple[dict, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} gauge")
    for labels, v in values:
        lines.append(f"{name}{_labels(labels)} {_num(v)}")


def _histogram(lines: list[str], name: str, help_text: str, samples: list[float]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for b in DURATION_BUCKETS:
        lines.append(f'{name}_bucket{{le="{_num(b)}"}} {sum(1 for s in samples if s <= b)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(samples)}')
    lines.append(f"{name}_sum {_num(round(sum(samples), 6))}")
    lines.append(f"{name}_count {len(samples)}")


def sql_metrics(session_factory, alert_after_s: Optional[float] = None) -> list[str]:
    """Gauges and the job-duration histogram, read from SQL."""
    from echonode.store import status as queries

    lines: list[str] = []
    with session_factory() as s:
        counts = queries.job_counts(s)
        totals = queries.ingest_totals(s)
        durations = queries.job_durations(s)
        outbox = _outbox_counts(s)
        dh = None
        if alert_after_s is not None:
            from echonode.store.status import delivery_health
            dh = delivery_health(s, alert_after_s)
    _gauge(lines, "echonode_jobs", "Analysis jobs by state", [({"state": k}, v) for k, v in sorted(counts.items())])
    _gauge(lines, "echonode_instances_stored", "Instances in the index", [({}, totals["instances"])])
    _gauge(lines, "echonode_stored_bytes", "Bytes of stored instances", [({}, totals["bytes"])])
    _histogram(lines, "echonode_job_duration_seconds", "Analysis job run time (most recent 1000 done jobs)",
               durations)
    if outbox is not None:
        _gauge(lines, "echonode_outbox", "Result objects in the outbox by state",
               [({"state": k}, v) for k, v in sorted(outbox.items())])
    if dh is not None:
        _gauge(lines, "echonode_outbox_oldest_undelivered_seconds",
               "Age of the oldest result object not yet delivered (0: none)", [({}, dh["oldest_undelivered_s"] or 0)])
        _gauge(lines, "echonode_delivery_alert",
               "1 while an outbox row is dead or the oldest undelivered object is older than delivery.alert_after_s",
               [({}, 0 if dh["ok"] else 1)])
    return lines


def _outbox_counts(session) -> Optional[dict[str, int]]:
    from echonode.store import outbox

    try:
        return {str(k): int(v) for k, v in dict(outbox.counts(session)).items()}
    except Exception:  # pragma: no cover - a metrics scrape never fails on the outbox
        log.debug("outbox counts unavailable", exc_info=True)
        return None


def render(session_factory=None, extra: Optional[Callable[[], list[str]]] = None,
           alert_after_s: Optional[float] = None) -> str:
    lines = REGISTRY.render()
    if session_factory is not None:
        lines += sql_metrics(session_factory, alert_after_s)
    if extra is not None:
        lines += extra()
    return "\n".join(lines) + "\n"


def health(session_factory, alert_after_s: Optional[float] = None) -> tuple[bool, dict]:
    """``(ok, body)`` for ``/healthz``: the database answers and, with ``alert_after_s``,
    delivery is healthy (:func:`echonode.store.status.delivery_health`)."""
    from echonode.store.db import ping
    try:
        ping(session_factory)
    except Exception as exc:
        return False, {"status": "unavailable", "reasons": [f"database unavailable: {type(exc).__name__}"]}
    body: dict = {"status": "ok", "reasons": []}
    if alert_after_s is not None:
        from echonode.store.status import delivery_health
        try:
            with session_factory() as s:
                dh = delivery_health(s, alert_after_s)
        except Exception as exc:
            return False, {"status": "unavailable", "reasons": [f"database unavailable: {type(exc).__name__}"]}
        body["delivery"] = dh
        if not dh["ok"]:
            body["status"] = "degraded"
            body["reasons"] += dh["reasons"]
    return body["status"] == "ok", body


class MetricsServer:
    """``/metrics`` and ``/healthz`` in a background thread."""

    def __init__(self, host: str, port: int, session_factory, extra: Optional[Callable[[], list[str]]] = None,
                 health_extra: Optional[Callable[[], tuple[bool, str]]] = None,
                 alert_after_s: Optional[float] = None) -> None:
        sf, ex, hx, alert = session_factory, extra, health_extra, alert_after_s

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, code = render(sf, ex, alert).encode(), 200
                    except Exception as exc:
                        body, code = f"# metrics unavailable: {type(exc).__name__}\n".encode(), 500
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    ok, doc = health(sf, alert)
                    if ok and hx is not None:
                        ok, msg = hx()
                        if not ok:
                            doc = {"status": "degraded", "reasons": [msg]}
                    body = (json.dumps(doc, sort_keys=True) + "\n").encode()
                    code, ctype = (200 if ok else 503), "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # quiet: no access log lines
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
