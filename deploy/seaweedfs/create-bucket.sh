#!/bin/sh
# One-shot: create the bucket owned by the "echonode" identity (start.sh) and make the
# filer fsync every write under it, so an acknowledged S3 PUT is on disk (echonode answers
# a C-STORE with Success only once the PUT is acknowledged). Safe to run again.
#   WEED_MASTER, WEED_FILER  host:port of the master and the filer (default seaweedfs:9333,
#                            seaweedfs:8888; host:port.grpcport when the gRPC port is not port+10000)
#   S3_BUCKET                default echonode
set -eu
master="${WEED_MASTER:-seaweedfs:9333}"
filer="${WEED_FILER:-seaweedfs:8888}"
bucket="${S3_BUCKET:-echonode}"
# weed shell waits for ever for an unreachable master: bound it, so `up` fails with a reason
shell() { echo "$1" | timeout 120 weed shell -master="$master" -filer="$filer" 2>&1; }
if ! out=$(shell "s3.bucket.create -name $bucket -owner echonode"); then
  case "$out" in
    *"already exists"*) ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
out=$(shell "fs.configure -locationPrefix=/buckets/$bucket/ -fsync -apply") || { echo "$out" >&2; exit 1; }
echo "bucket $bucket ready (fsync on)"
