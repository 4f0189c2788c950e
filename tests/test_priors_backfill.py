"""`echonode priors backfill` against a real Orthanc: killed with kill -9, restarted, every
prior embedded exactly once (issue 17)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.orthanc import _free_port
from tests.fixtures.pipeline import phantom_study
from tests.test_priors import ISSUER, _embeddings, _pacs, _sessions, _upload

ROOT = Path(__file__).resolve().parents[1]


def test_backfill_kill9_restart_embeds_each_once(tmp_path, tiny_bundle, tiny_bundle_r):
    from echonode.store import priors as ledger

    pacs = _pacs(tmp_path, _free_port())
    try:
        uids = []
        for i in range(6):
            u, files = phantom_study(tmp_path / "ph", patient_id=f"BF{i:03d}", study_date=f"2024{i + 1:02d}10",
                                     seed=100 + i, n_clips=1, n_frames=8, size=96, label=f"bf{i}")
            _upload(pacs, files, ISSUER)
            uids.append(u)
        cfg = tmp_path / "node.toml"
        cfg.write_text(f"""
data_dir = "{tmp_path / 'node'}"
[model]
clip_model = "{tiny_bundle.path}"
r_model = "{tiny_bundle_r.path}"
frames = 4
[priors]
enabled = true
backfill_concurrency = 1
[[priors.sources]]
name = "pacs"
kind = "dimse"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs.dicom_port}
retrieve = "get"
timeout_s = 20
""")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "echonode", "priors", "backfill", "--config", str(cfg), "--since", "20240101"]
        from echonode.config import load_settings
        settings = load_settings(cfg, env={})
        sessions = _sessions(settings)
        # first run: slowed to one study per 3 s, killed with SIGKILL after two are embedded
        proc = subprocess.Popen(cmd + ["--rate", "20/min"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with sessions() as s:
                if ledger.counts(s)[ledger.EMBEDDED] >= 2:
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with sessions() as s:
            first = ledger.counts(s)
        assert 2 <= first[ledger.EMBEDDED] < 6, first
        # restart: finishes the rest, prints a summary, progress bar on stderr
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
        assert summary["found"] == 6 and summary["embedded"] == 6 - first[ledger.EMBEDDED], summary
        assert "priors backfill" in done.stderr.decode()
        for u in uids:
            assert len(_embeddings(sessions, u)) == 1
        with sessions() as s:
            entries = {e.study_instance_uid: e for e in ledger.entries(s)}
        assert set(entries) == set(uids) and all(e.state == ledger.EMBEDDED for e in entries.values())
        # a third run has nothing to do
        again = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert json.loads(again.stdout.decode().strip().splitlines()[-1])["embedded"] == 0
    finally:
        pacs.stop()
