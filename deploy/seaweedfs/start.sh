#!/bin/sh
# SeaweedFS (master, volume, filer, S3 in one process) with one S3 identity, "echonode",
# whose keys come from the environment, so no key is written in a file of this repository.
# The identity may read, write, list and tag the one bucket (create-bucket.sh makes it and
# gives it this owner) and nothing else. Arguments go to `weed server`.
#   S3_ACCESS_KEY, S3_SECRET_KEY  the key pair (required; letters, digits and / + = . _ -)
#   S3_BUCKET                     default echonode
#   S3_IDENTITY_FILE              where the generated identity file goes (default /tmp/s3.json,
#                                 a tmpfs in deploy/compose.yaml)
set -eu
: "${S3_ACCESS_KEY:?S3_ACCESS_KEY is required}" "${S3_SECRET_KEY:?S3_SECRET_KEY is required}"
bucket="${S3_BUCKET:-echonode}"
conf="${S3_IDENTITY_FILE:-/tmp/s3.json}"
# the values go into JSON unescaped: refuse anything that would need escaping
case "$S3_ACCESS_KEY$S3_SECRET_KEY$bucket" in
  *[!A-Za-z0-9/+=._-]*) echo "start.sh: S3 keys and bucket may hold only letters, digits and / + = . _ -" >&2; exit 2 ;;
esac
umask 077
printf '{"identities": [{"name": "echonode", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Read:%s", "Write:%s", "List:%s", "Tagging:%s"]}]}\n' \
  "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "$bucket" "$bucket" "$bucket" "$bucket" > "$conf"
exec weed server -s3 -s3.config="$conf" "$@"
