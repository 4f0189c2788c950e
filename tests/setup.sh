#!/usr/bin/env bash
# Prepare a Debian machine (run as root) for `python3 -m pytest`: the system tools the tests
# drive, the Python packages, and the PostgreSQL and Redis servers the tests talk to.
# Safe to run again: it installs only what is missing and starts only what is down.
#
# This is for a disposable test machine or CI runner: it lets the local `postgres` role in
# without a password over 127.0.0.1 (the tests create and drop their own databases).
# Python packages go into the `python3` on PATH; activate a virtual environment first to keep
# them there. Debian's own python3 is "externally managed" (PEP 668); outside a virtual
# environment the script then says so and installs with --break-system-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# --- Debian packages the tests drive
# dcmtk: the echo cart (storescu, echoscu, dcmsend) and SR dumps; dicom3tools: dciodvfy validates
# what the node writes; orthanc + orthanc-dicomweb: the PACS; redis, postgresql: the broker and the
# database; openssl: test CAs for DICOM TLS; rsyslog: audit log delivery; tesseract-ocr, chromium,
# fonts-dejavu-core: burned-in text checks and the results view; docker-compose: validates
# deploy/compose.yaml (no engine needed); python3-pip/-venv: a fresh Debian has neither.
packages=(dcmtk dicom3tools orthanc orthanc-dicomweb redis-server redis-tools postgresql openssl
          rsyslog rsyslog-openssl socat strace tesseract-ocr chromium fonts-dejavu-core docker-compose python3-pip python3-venv)
need=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The orthanc package may start a system instance; the tests start their own on free ports.

# --- Python: torch first (the pinned build the model code is tested with), then the project
pip_args=(-q)
if python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  echo "tests/setup.sh: $(command -v python3) is the system Python; installing with --break-system-packages" >&2
  pip_args+=(--break-system-packages)
fi
python3 -m pip install "${pip_args[@]}" torch==2.14.1 torchvision==0.29.1
python3 -m pip install "${pip_args[@]}" -e '.[test]'

# --- PostgreSQL on 127.0.0.1:5432, role postgres without a password
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  cluster="$(ls /etc/postgresql | sort -V | tail -n 1)"
  pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! psql -w -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
  cluster="$(ls /etc/postgresql | sort -V | tail -n 1)"
  hba="/etc/postgresql/$cluster/main/pg_hba.conf"
  grep -q '^host all postgres 127.0.0.1/32 trust' "$hba" ||
    sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$cluster" main reload
  for _ in $(seq 30); do psql -w -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
fi

# --- Redis on 127.0.0.1:6379
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/tests.log
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
echo "tests/setup.sh: ready; run: python3 -m pytest -q"
