#!/usr/bin/env bash
# Installs the Debian packages the tests need, only when they are missing.
# Tests that need one of them and cannot find it fail loudly rather than skip.
set -u
need=()
[ -x /usr/sbin/postfix ] || need+=(postfix)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v php >/dev/null 2>&1 || need+=(php-cli)
command -v swaks >/dev/null 2>&1 || need+=(swaks libnet-ssleay-perl libio-socket-ssl-perl)
# PostgreSQL's server binaries (initdb, pg_ctl) for the fleet tests' throwaway cluster
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# opendkim-testmsg: the independent verifier of relayd's DKIM signatures (tests/support/opendkim.py);
# opendkim: the milter of the Postfix + OpenDKIM benchmark peer (bench/postfix.py).
[ -x /usr/sbin/opendkim-testmsg ] || need+=(opendkim-tools)
[ -x /usr/sbin/opendkim ] || need+=(opendkim)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-sysdeps: missing ${need[*]} and not root; run: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
