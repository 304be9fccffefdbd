#!/usr/bin/env bash
# System packages the tests use: the psql client (with TLS), openssl (test
# certificates), a PostgreSQL server built with TLS (the pinned pip wheel's
# server has no TLS, so upstream-TLS tests use this one) and Debian's
# chromium for the Activity Queue's browser tests (playwright drives it; its
# own browser download cannot work without a network). Installs with
# apt-get when something is missing and we are root; otherwise says what to
# install.
set -euo pipefail
missing=()
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
# the fonts package gives headless chromium readable text in screenshots
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "please install: ${missing[*]}" >&2
  exit 1
fi
