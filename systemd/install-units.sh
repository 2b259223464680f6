#!/usr/bin/env bash
# Installs Tarefa's systemd units on this host (see systemd/README.md):
#   - the `tarefa` system user and group (sysusers.d/tarefa.conf),
#   - the units into /etc/systemd/system/ (overwritten: local changes belong
#     in drop-ins made with `systemctl edit`),
#   - /etc/tarefa/ (root:tarefa 0750) and, only when none exists yet,
#     /etc/tarefa/cluster.yaml from cluster.one-host.yaml,
#   - the secrets that file names (`tarefa-secrets --owner tarefa`: only the
#     missing ones), readable by tarefa only, e.g. /etc/tarefa/secrets/,
#   - where the broker's address is local: /etc/mosquitto/conf.d/tarefa.conf
#     and copies of the MQTT password and ACL files for Mosquitto, refreshed
#     on every run (mosquitto.service is restarted if it runs and they changed),
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

# The secrets the cluster file names (security: and broker.password_dir):
# tarefa-secrets makes whatever is missing and never overwrites; the helper
# then gives them to tarefa (directories root:tarefa 0750, secrets 0600,
# certificates 0644, the CA key root-only). Under --root the file's absolute
# /etc/tarefa/... paths are moved under DIR, and ownership comes from
# DIR/etc/passwd. See install-helper.py for the details.
uid=$(awk -F: '$1 == "tarefa" { print $3 }' "$root/etc/passwd")
broker_host= broker_port= broker_local= mqtt_passwd= mqtt_acl=
owner=(--owner tarefa)          # a user of this machine: not under --root
[ -n "$root" ] && owner=(--root "$root")
secrets_out=$("$code/.venv/bin/python" "$here/install-helper.py" secrets "${owner[@]}" \
    --config "$config" --uid "$uid" --gid "$gid") \
    || die "secrets not made (see above): fix that, then re-run"
eval "$secrets_out"

# Mosquitto (Debian's mosquitto.service), where the broker's address is local:
# per-daemon logins only, from copies of tarefa-secrets' files that the
# mosquitto user can read (it drops root before reading them) and that
# newer Mosquitto releases accept (owned by it, not readable by others).
# The per-daemon passwords are the source of truth: every run refreshes them.
mosquitto_changed=0
refresh() {  # refresh SRC DST OWNER MODE: copy when different, note it
    if ! cmp -s "$1" "$2" || [ "$(stat -c %u:%g:%a "$2")" != "$3:$4" ]; then
        install -m "$4" -o "${3%%:*}" -g "${3##*:}" "$1" "$2"
        mosquitto_changed=1
        say "wrote $2"
    fi
}
mosquitto_ids=$(awk -F: '$1 == "mosquitto" { print $3 ":" $4 }' "$root/etc/passwd")
if [ -z "$mqtt_passwd" ]; then
    say "broker.password_dir is not set: Mosquitto left as it is"
elif [ "$broker_local" != 1 ]; then
    say "the broker ($broker_host) is not an address of this machine: no Mosquitto config here"
elif [ -z "$mosquitto_ids" ]; then
    say "warning: no mosquitto user in $root/etc/passwd (is Debian's mosquitto package" \
        "installed?): $root/etc/mosquitto/conf.d/tarefa.conf not written"
else
    install -d -m 0755 "$root/etc/mosquitto/conf.d"
    refresh "$mqtt_passwd" "$root/etc/mosquitto/tarefa.passwd" "$mosquitto_ids" 600
    refresh "$mqtt_acl" "$root/etc/mosquitto/tarefa.acl" "$mosquitto_ids" 600
    snippet=$(mktemp)
    cat >"$snippet" <<CONF
# Written by install-units.sh from $config (broker: and broker.password_dir);
# re-run it instead of editing this file: it is overwritten. The two files
# below are copies of tarefa-secrets' ${mqtt_passwd#"$root"} and ${mqtt_acl#"$root"}.
listener $broker_port $broker_host
allow_anonymous false
password_file /etc/mosquitto/tarefa.passwd
acl_file /etc/mosquitto/tarefa.acl
# Mosquitto drops QoS 1 messages beyond 1000 queued per client (its default):
# the listener's audit log would silently miss events (config/mosquitto.conf).
max_queued_messages 1000000
CONF
    refresh "$snippet" "$root/etc/mosquitto/conf.d/tarefa.conf" 0:0 644
    rm -f "$snippet"
fi

if [ -n "$root" ]; then
    say "--root given: systemd not reloaded"
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload done"
    # New logins or a new listener line: a running broker must restart to
    # use them (try-restart never starts a stopped one).
    if [ "$mosquitto_changed" = 1 ] && systemctl --quiet is-active mosquitto.service; then
        systemctl try-restart mosquitto.service
        say "Mosquitto's configuration changed: restarted mosquitto.service"
    fi
else
    say "systemd is not running on this machine: nothing reloaded"
fi

[ "$enable" = 1 ] || { say "done (daemons not enabled: see --enable)"; exit 0; }

# Which daemons live here: those whose host is an address this machine can
# bind. The cluster file is validated first (exit 2 lists every problem).
local_units=$("$code/.venv/bin/python" "$here/install-helper.py" local-units \
    --config "$root$config") || die "cannot read $root$config (see above): fix it, then re-run with --enable"

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
