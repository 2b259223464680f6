#!/usr/bin/env bash
# Installs Tarefa's systemd units on this host (see systemd/README.md):
#   - the `tarefa` system user and group (sysusers.d/tarefa.conf),
#   - the units into /etc/systemd/system/ (overwritten: local changes belong
#     in drop-ins made with `systemctl edit`),
#   - /etc/tarefa/ (root:tarefa 0750) and, only when none exists yet,
#     /etc/tarefa/cluster.yaml from cluster.one-host.yaml,
#   - then `systemctl daemon-reload`.
# With --enable it also enables tarefa.target and every daemon of the cluster
# file whose `host` is an address of this machine (and mosquitto.service when
# the broker is one). It never starts anything. Safe to re-run.
#
# Usage: systemd/install-units.sh [--enable] [--root DIR]
#   --root DIR  install into DIR instead of / (packaging, tests): the code need
#               not be in /opt/tarefa yet and systemd is not reloaded.
set -euo pipefail

PREFIX=/opt/tarefa
UNITS=(tarefa-replica@.service tarefa-portal@.service tarefa-listener.service tarefa.target)

say() { printf 'install-units.sh: %s\n' "$*"; }
die() { printf 'install-units.sh: error: %s\n' "$*" >&2; exit 1; }

enable=0
root=
while [ $# -gt 0 ]; do
    case "$1" in
        --enable) enable=1 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$(realpath -m "$2"); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ "$root" = / ] && root=

[ "$(id -u)" = 0 ] || die "must be run as root: it creates a system user and writes /etc"

here=$(cd "$(dirname "$0")" && pwd -P)
code=$(dirname "$here")
if [ -z "$root" ]; then
    [ "$(realpath -m "$PREFIX")" = "$code" ] \
        || die "the units run the code in $PREFIX, but this checkout is $code: put it in $PREFIX" \
               "(or make $PREFIX a link to it) and run $PREFIX/install.sh first"
    [ -x "$PREFIX/.venv/bin/tarefa-replica" ] \
        || die "$PREFIX/.venv/bin/tarefa-replica is missing: run $PREFIX/install.sh first"
    # ProtectHome= hides /root and /home from the daemons, and the tarefa user
    # could not enter /root anyway: the venv's interpreter must live elsewhere.
    case "$(realpath "$PREFIX/.venv/bin/python")" in
        /root/*|/home/*)
            die "$PREFIX/.venv is built on $(realpath "$PREFIX/.venv/bin/python"), which the" \
                "units cannot reach: rebuild it with  rm -rf $PREFIX/.venv &&" \
                "PYTHON=/usr/bin/python3 $PREFIX/install.sh" ;;
    esac
fi

# The user: systemd-sysusers is idempotent and also recreates it on image-based
# systems at boot.
install -D -m 0644 "$here/tarefa.sysusers" "$root/etc/sysusers.d/tarefa.conf"
systemd-sysusers ${root:+--root="$root"} tarefa.conf
gid=$(awk -F: '$1 == "tarefa" { print $3 }' "$root/etc/group")
[ -n "$gid" ] || die "group tarefa is missing from $root/etc/group after systemd-sysusers"
say "user tarefa present (gid $gid)"
if [ -z "$root" ]; then
    setpriv --reuid=tarefa --regid=tarefa --clear-groups \
        "$PREFIX/.venv/bin/tarefa-replica" --help >/dev/null \
        || die "the tarefa user cannot run $PREFIX/.venv/bin/tarefa-replica: make $PREFIX" \
               "readable by it (root-owned, mode 755 directories, 644 files)"
fi

install -d -m 0755 "$root/etc/systemd/system"
for unit in "${UNITS[@]}"; do
    install -m 0644 "$here/$unit" "$root/etc/systemd/system/$unit"
done
say "installed ${UNITS[*]} into $root/etc/systemd/system"

# The cluster file may hold the broker password: readable by the daemons only.
config=/etc/tarefa/cluster.yaml
install -d -m 0750 -o 0 -g "$gid" "$root/etc/tarefa"
if [ -e "$root$config" ]; then
    say "keeping the existing $root$config"
else
    install -m 0640 -o 0 -g "$gid" "$here/cluster.one-host.yaml" "$root$config"
    say "installed a single-machine $root$config" \
        "(edit it for several machines: see $here/README.md)"
fi

if [ -n "$root" ]; then
    say "--root given: systemd not reloaded"
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload done"
else
    say "systemd is not running on this machine: nothing reloaded"
fi

[ "$enable" = 1 ] || { say "done (daemons not enabled: see --enable)"; exit 0; }

# Which daemons live here: those whose host is an address this machine can
# bind. The cluster file is validated first (exit 2 lists every problem).
local_units=$(cd "$code" && "$code/.venv/bin/python" - "$root$config" <<'PY'
import socket
import sys

from daemons.core.config import load_cluster
from daemons.core.errors import ConfigError


def is_local(host: str) -> bool:
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, _, _, address in addresses:
        try:
            with socket.socket(family, kind) as sock:
                sock.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


try:
    cluster = load_cluster(sys.argv[1])
except ConfigError as exc:
    for problem in exc.problems:
        print(f"Error: {problem}", file=sys.stderr)
    sys.exit(2)
units = [f"tarefa-replica@{r.id}.service" for r in cluster.replicas if is_local(r.host)]
units += [f"tarefa-portal@{p.id}.service" for p in cluster.portals if is_local(p.host)]
if cluster.listener is not None and is_local(cluster.listener.host):
    units.append("tarefa-listener.service")
if is_local(cluster.broker.host):
    units.append("mosquitto.service")
print("\n".join(units))
PY
) || die "cannot read $root$config (see above): fix it, then re-run with --enable"

tarefa_units=$(grep '^tarefa-' <<<"$local_units" || true)
[ -n "$tarefa_units" ] \
    || die "no daemon in $root$config has a host that is an address of this machine"
# shellcheck disable=SC2086  # one unit name per word
systemctl ${root:+--root="$root"} --quiet enable $tarefa_units tarefa.target
say "enabled tarefa.target and:" $tarefa_units
if grep -qx mosquitto.service <<<"$local_units"; then
    if systemctl ${root:+--root="$root"} --quiet enable mosquitto.service 2>/dev/null; then
        say "the broker address is on this machine: enabled mosquitto.service"
    else
        say "warning: the broker address is on this machine but mosquitto.service" \
            "could not be enabled (is Debian's mosquitto package installed?)"
    fi
fi
say "done: start with  systemctl start tarefa.target"
