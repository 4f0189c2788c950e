"""Outbound TLS: delivery checks the identity of the PACS, whatever the destination.

Real peers: DCMTK ``storescp +tls`` as the PACS (the certificate it presents is the only
thing that changes between cases), and a pynetdicom SCP limited to TLS 1.0/1.1 for the
legacy case. Every failing case also shows that the peer itself works (a client that skips
the one check under test gets through), so a failure can only come from that check.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from conftest import free_port
from echonode.config import ConfigError, load_settings
from echonode.dicom import scu
from echonode.store import db
from echonode.store import outbox as ob
from tests.fixtures.interp import make_interpretation, make_sources, publish_results
from tests.fixtures.node import dcmtk
from tests.fixtures.orthanc import make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """The test CA with a server certificate for IP 127.0.0.1 (make_test_pki) and, signed by
    the same CA, one for another host (DNS pacs.elsewhere.example, IP 10.9.8.7)."""
    folder = tmp_path_factory.mktemp("pki")
    paths = make_test_pki(folder)

    def run(*args):
        return subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, text=True,
                              timeout=60).stdout

    (folder / "other.cnf").write_text("subjectAltName=DNS:pacs.elsewhere.example,IP:10.9.8.7\n"
                                      "basicConstraints=CA:FALSE\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.csr",
        "-subj", "/CN=pacs.elsewhere.example")
    run("x509", "-req", "-in", "other.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "other.pem", "-days", "2", "-extfile", "other.cnf")
    paths.update(other_cert=str(folder / "other.pem"), other_key=str(folder / "other.key"))
    # "sha256 Fingerprint=AB:CD:..." as an operator would copy it into the config
    for name in ("server", "other"):
        out = run("x509", "-noout", "-fingerprint", "-sha256", "-in", f"{name}.pem")
        paths[f"{name}_pin"] = out.strip().split("=", 1)[1]
    return paths


@pytest.fixture(scope="module")
def sources(realworld_dir):
    return make_sources(realworld_dir)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"storescp exited: {proc.stderr.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("storescp did not listen")


@contextlib.contextmanager
def storescp_tls(folder: Path, key: str, cert: str, ca: str):
    """DCMTK storescp speaking TLS only (BCP 195 profile) with the given certificate."""
    port = free_port()
    out = folder / f"received-{port}"
    out.mkdir(parents=True)
    proc = subprocess.Popen([dcmtk("storescp"), "+tls", key, cert, "+cf", ca, "-ic", "-aet", "PACS",
                             "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        yield port, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _handshake(port: int, ca: str, *, check_hostname: bool = True, legacy: bool = False) -> str:
    """A plain TLS client (no DICOM): the negotiated version, or raises ssl.SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = check_hostname
    if legacy:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.version()


def _deliver(tmp_path: Path, sources, port: int, ca: str, *, pin: str = "", tag: str):
    """publish + deliver_pending to a TLS destination at 127.0.0.1:port: (summary, outbox row)."""
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp_path / f"data-{tag}"),
        "node": {"ae_title": "ECHONODE", "dimse_timeout_s": 10, "acse_timeout_s": 10, "network_timeout_s": 10},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                       "tls": {"enabled": True, "ca": ca}, "tls_pin_sha256": pin}]}})
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    sf = db.session_factory(engine)
    try:
        with sf() as s:
            publish_results(settings, s, make_interpretation(sources, promptcams=False), sources)
        summary = scu.deliver_pending(settings, sf)
        with sf() as s:
            rows = [r.as_dict() for r in ob.list_rows(s, limit=10)]
            row = next(r for r in rows if r["kind"] == "sr")
    finally:
        engine.dispose()
    return summary, row


def _received(out: Path) -> list[str]:
    """Modality prefixes of the files storescp wrote (it names them <modality>.<SOP UID>)."""
    return sorted(p.name[:2] for p in out.iterdir())


def _failed(summary, row) -> bool:
    return summary.delivered == 0 and row["state"] == "pending" and row["attempts"] == 1


def test_certificate_for_another_host_fails_right_ip_in_san_succeeds(pki, sources, tmp_path):
    with storescp_tls(tmp_path, pki["other_key"], pki["other_cert"], pki["ca"]) as (port, out):
        # The certificate is valid (same CA); only the name is wrong.
        _handshake(port, pki["ca"], check_hostname=False)
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            _handshake(port, pki["ca"])
        summary, row = _deliver(tmp_path, sources, port, pki["ca"], tag="other")
        assert _failed(summary, row), row
        assert not list(out.iterdir())
    with storescp_tls(tmp_path, pki["server_key"], pki["server_cert"], pki["ca"]) as (port, out):
        summary, row = _deliver(tmp_path, sources, port, pki["ca"], tag="right")
        assert summary.delivered == summary.claimed == 2 and row["state"] == "delivered", row
        assert _received(out) == ["SC", "SR"]   # the SR and the key-results page


def test_certificate_pin(pki, sources, tmp_path):
    with storescp_tls(tmp_path, pki["server_key"], pki["server_cert"], pki["ca"]) as (port, out):
        summary, row = _deliver(tmp_path, sources, port, pki["ca"], pin=pki["other_pin"], tag="wrongpin")
        assert _failed(summary, row), row
        assert not list(out.iterdir())
        summary, row = _deliver(tmp_path, sources, port, pki["ca"], pin=pki["server_pin"], tag="rightpin")
        assert summary.delivered == summary.claimed == 2 and row["state"] == "delivered", row
        assert _received(out) == ["SC", "SR"]   # the SR and the key-results page


def test_tls_1_1_only_peer_fails(pki, sources, tmp_path):
    """A DICOM peer that speaks at most TLS 1.1 (a legacy client reaches it) is refused."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    stored = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        assert _handshake(port, pki["ca"], legacy=True) in ("TLSv1", "TLSv1.1")
        summary, row = _deliver(tmp_path, sources, port, pki["ca"], tag="tls11")
        assert _failed(summary, row), row
        assert stored == []
    finally:
        server.shutdown()


@pytest.mark.parametrize("dest,message", [
    ({"tls": {"enabled": True}, "tls_pin_sha256": "abc"}, "tls_pin_sha256: expected 64 hex digits"),
    ({"tls": {"enabled": True}, "tls_pin_sha256": "zz" * 32}, "tls_pin_sha256: expected 64 hex digits"),
    ({"tls_pin_sha256": "ab" * 32}, "tls_pin_sha256 needs delivery.destinations.tls.enabled"),
])
def test_pin_is_validated_at_load(dest, message):
    base = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}
    with pytest.raises(ConfigError) as ei:
        load_settings(env={}, overrides={"delivery": {"destinations": [dict(base, **dest)]}})
    assert "delivery.destinations[name='pacs']" in str(ei.value) and message in str(ei.value)
    ok = load_settings(env={}, overrides={"delivery": {"destinations": [
        dict(base, tls={"enabled": True}, tls_pin_sha256=":".join(["AB"] * 32))]}})
    assert ok.delivery.destinations[0].tls_pin_sha256 == "ab" * 32
