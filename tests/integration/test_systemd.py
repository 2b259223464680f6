"""The systemd units in systemd/: they verify, they agree with the code and the
cluster files, the daemons notify readiness as Type=notify expects and run
inside the units' sandbox, and install-units.sh installs them.

How each check stays honest on a machine where systemd is not PID 1 and
Tarefa is not installed in /opt/tarefa:

- `systemd-analyze verify` runs on the shipped units with one change only:
  the install prefix /opt/tarefa is replaced by this checkout, so that verify
  checks that every ExecStart= program really exists in our .venv (it checks
  executables on the real file system). Everything else is verified as
  shipped, including ordering against the host's own mosquitto.service and
  network-online.target. verify exits 0 on unknown keys and bad values (it
  only prints them), so any output at all is a failure; a misspelt copy
  proves the check catches that.
- Readiness: a replica is started with the very command line of its unit's
  ExecStart= (prefix and config path substituted), with NOTIFY_SOCKET naming
  an AF_UNIX datagram socket this test binds, as systemd's is. The sender's
  PID is read from SCM_CREDENTIALS, so NotifyAccess=main holds too.
- install-units.sh --root DIR runs tarefa-secrets on the staged cluster
  file with its /etc/tarefa paths moved under DIR; the tests check owners
  and modes, read every secret as the staged tarefa uid (and fail to read
  the CA key), run --check-config of each daemon on the staged file, and
  start the real Mosquitto on the staged snippet and copies (it drops to
  the mosquitto user before reading them) to log in as a portal.
- The sandbox cannot be applied by systemd here, so its file-system and
  privilege part is emulated with unshare/mount/setpriv: the whole tree
  read-only except the replica's data directory (ProtectSystem=strict +
  StateDirectory=), /root and /home hidden (ProtectHome=), an unprivileged
  uid without capabilities (User=, CapabilityBoundingSet=) and
  no_new_privs (NoNewPrivileges=). The seccomp, address-family and kernel
  protections are not emulated.

Missing tools (systemd-analyze, systemctl, systemd-sysusers: Debian's
`systemd` package, which ./install.sh installs) and missing root fail the
test with a message; nothing here is skipped.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from dataclasses import dataclass

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemons.core.config import load_cluster
from proto import replica_pb2 as pb
from tests.conftest import failed
from tests.harness import (ROOT, ReplicaCluster, ReplicaProcess, apply_with_retry,
                           new_request_id)

UNIT_DIR = os.path.join(ROOT, "systemd")
PREFIX = "/opt/tarefa"
CONFIG = "/etc/tarefa/cluster.yaml"
SERVICES = ("tarefa-replica@.service", "tarefa-portal@.service", "tarefa-listener.service")
UNITS = (*SERVICES, "tarefa.target")
EXAMPLES = ("cluster.one-host.yaml", "cluster.multi-host.yaml")
STATE = "/var/lib/tarefa"
SANDBOX_UID = 65534  # nobody: stands in for the unprivileged `tarefa` user
WAIT = 30.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's `systemd` package (./install.sh "
                    "does it when systemd-analyze is missing); this test never skips",
                    pytrace=False)
    return path


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (like ./install.sh); run the suite as root",
                    pytrace=False)


def unit_text(name: str) -> str:
    with open(os.path.join(UNIT_DIR, name), encoding="utf-8") as fh:
        return fh.read()


def directives(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line; keys may repeat, so no configparser."""
    out, section = [], ""
    for raw in unit_text(name).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def setting(name: str, key: str) -> str:
    values = [v for _, k, v in directives(name) if k == key]
    assert len(values) == 1, f"{name}: expected one {key}=, found {values}"
    return values[0]


def sandbox_block(name: str) -> list[tuple[str, str]]:
    text = unit_text(name)
    block = text[text.index("# Sandbox"):text.index("[Install]")]
    return [tuple(line.split("=", 1)) for line in block.splitlines()  # type: ignore[misc]
            if line and not line.startswith("#")]


def exec_start(name: str, config: str, instance: str) -> list[str]:
    """The unit's ExecStart= as argv, for this checkout instead of /opt/tarefa."""
    line = setting(name, "ExecStart")
    assert line.startswith(PREFIX + "/.venv/bin/") and f"--config {CONFIG}" in line, line
    return shlex.split(line.replace(PREFIX, ROOT).replace(CONFIG, config)
                       .replace("%i", instance))


def render(directory: str, units: tuple[str, ...] = UNITS) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in units:
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(unit_text(name).replace(PREFIX, ROOT))
        paths.append(path)
    return paths


def verify(paths: list[str], cwd: str) -> str:
    result = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", *paths], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}".strip()


# ---- the unit files --------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path):
    paths = render(str(tmp_path / "units"))
    assert verify(paths, str(tmp_path)) == "exit 0"

    # verify exits 0 on a misspelt key: only its output tells, so check that.
    bad = tmp_path / "bad"
    render(str(bad), ("tarefa-replica@.service",))
    unit = bad / "tarefa-replica@.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    assert "Unknown key 'ProtectSytem'" in verify([str(unit)], str(tmp_path))


def test_units_run_the_console_scripts_with_their_cluster_file(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    # --check-config also reads the secrets the file names (/etc/tarefa/secrets):
    # check a copy whose secrets live under tmp_path, made by tarefa-secrets.
    example = str(tmp_path / "cluster.multi-host.yaml")
    with open(os.path.join(UNIT_DIR, "cluster.multi-host.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    assert "/etc/tarefa/secrets/" in text
    with open(example, "w", encoding="utf-8") as fh:
        fh.write(text.replace("/etc/tarefa/secrets/", f"{tmp_path}/secrets/"))
    subprocess.run([os.path.join(ROOT, ".venv", "bin", "tarefa-secrets"), "--config", example],
                   check=True, capture_output=True, timeout=60)
    cluster = load_cluster(example)
    instances = {"tarefa-replica@.service": cluster.replicas[0].id,
                 "tarefa-portal@.service": cluster.portals[0].id,
                 "tarefa-listener.service": ""}
    for name in SERVICES:
        argv = exec_start(name, example, instances[name])
        assert os.path.basename(argv[0]) in scripts, f"{name}: {argv[0]} is no console script"
        # The exact ExecStart= line accepts the example file (and the instance id).
        check = subprocess.run([*argv, "--check-config"], capture_output=True, text=True,
                               timeout=60, cwd="/")
        assert check.returncode == 0, f"{name}: {argv}\n{check.stdout}{check.stderr}"


def test_units_share_lifecycle_and_sandbox_settings():
    expected = {"Type": "notify", "NotifyAccess": "main", "User": "tarefa", "Group": "tarefa",
                "Restart": "on-failure", "RestartPreventExitStatus": "2",
                "KillSignal": "SIGTERM", "ExecReload": "/bin/kill -HUP $MAINPID",
                "PartOf": "tarefa.target", "WantedBy": "tarefa.target"}
    graces = [load_cluster(os.path.join(ROOT, "config", "cluster.yaml")).grace_seconds]
    graces += [load_cluster(os.path.join(UNIT_DIR, e)).grace_seconds for e in EXAMPLES]
    reference = sandbox_block(SERVICES[0])
    assert ("ProtectSystem", "strict") in reference and ("NoNewPrivileges", "yes") in reference
    # The daemons read /etc/tarefa/secrets (strict leaves it readable) but not the CA key.
    for example in EXAMPLES:
        tls = load_cluster(os.path.join(UNIT_DIR, example)).security.tls
        assert tls is not None and tls.ca_file.startswith("/etc/tarefa/secrets/"), example
        ca_key = os.path.join(os.path.dirname(tls.ca_file), "ca.key")
        assert ("InaccessiblePaths", f"-{ca_key}") in reference, example
    assert not [v for k, v in reference if k in ("InaccessiblePaths", "TemporaryFileSystem")
                and "/etc/tarefa/secrets" in v and not v.endswith("ca.key")]
    for name in SERVICES:
        for key, value in expected.items():
            assert setting(name, key) == value, f"{name}: {key}"
        assert sandbox_block(name) == reference, f"{name}: sandbox differs from {SERVICES[0]}"
        # SIGTERM drains for grace_seconds, then Raft/LevelDB/MQTT close: never SIGKILL first.
        assert float(setting(name, "TimeoutStopSec")) >= max(graces) + 10, name
        assert "network-online.target" in setting(name, "After"), name
    for name in SERVICES[1:]:
        assert "mosquitto.service" in setting(name, "After").split(), name
    assert setting("tarefa.target", "WantedBy") == "multi-user.target"


def test_units_sandbox_exposure_stays_low():
    for name in SERVICES:
        result = subprocess.run([tool("systemd-analyze"), "security", "--offline=true",
                                 "--threshold=20", os.path.join(UNIT_DIR, name)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}: exposure above 2.0\n{result.stdout[-3000:]}"


def test_cluster_files_keep_state_where_the_units_allow_writes():
    assert setting("tarefa-replica@.service", "StateDirectory") == "tarefa/%i"
    assert setting("tarefa-listener.service", "StateDirectory") == "tarefa/listener"
    assert not [k for _, k, _ in directives("tarefa-portal@.service") if k == "StateDirectory"]
    for example in EXAMPLES:
        cluster = load_cluster(os.path.join(UNIT_DIR, example))
        # As config/cluster.yaml (found by review: the systemd examples left it off).
        assert cluster.raft.fsync, f"{example}: raft.fsync"
        for replica in cluster.replicas:
            assert replica.data_dir == f"{STATE}/{replica.id}", example
        assert cluster.listener is not None
        assert os.path.dirname(cluster.listener.audit_log) == f"{STATE}/listener", example
    multi = load_cluster(os.path.join(UNIT_DIR, "cluster.multi-host.yaml"))
    hosts = [r.host for r in multi.replicas]
    assert len(set(hosts)) == len(hosts) and "127.0.0.1" not in hosts, "one replica per host"
    with open(os.path.join(UNIT_DIR, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(UNIT_DIR, "cluster.multi-host.yaml"), encoding="utf-8") as fh:
        assert fh.read() in readme, "systemd/README.md must show cluster.multi-host.yaml as is"


# ---- readiness and the sandbox, on real replica processes ------------------


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int
    uid: int


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket that also learns
    each sender's credentials (SO_PASSCRED)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)  # an unprivileged daemon must be able to send
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Notification] = []

    def wait_for(self, line: str, timeout: float = WAIT) -> Notification:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line!r} on {self.path} within {timeout}s "
                                   f"(received: {[n.fields for n in self.received]})")
            self.sock.settimeout(remaining)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            pid = uid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _ = struct.unpack("3i", payload[:12])
            fields = dict(item.split("=", 1) for item in data.decode().splitlines() if item)
            note = Notification(fields, pid, uid)
            self.received.append(note)
            key, value = line.split("=", 1)
            if fields.get(key) == value:
                return note

    def close(self) -> None:
        self.sock.close()


def home_hidden_interpreter() -> str | None:
    """The venv's base interpreter, when it lives under /root or /home."""
    prefix = os.path.realpath(sys.base_prefix)
    return prefix if prefix.startswith(("/root/", "/home/")) else None


def stub_dir(cluster: ReplicaCluster) -> str:
    return os.path.join(cluster.workdir, "interpreter")


def sandbox(data_dir: str, stub: str) -> list[str]:
    """Wrap a command in the emulated sandbox of the units (see the module doc).

    /root and /home become empty read-only tmpfs. Only if this machine's .venv
    is built on an interpreter inside them (pyenv in /root here) is that one
    directory put back, read-only, moved in through `stub`: a real install
    must not do that (install-units.sh refuses such a .venv), but the test
    must run the interpreter it has.
    """
    q = shlex.quote
    interpreter = home_hidden_interpreter()
    homes = [d for d in ("/root", "/home") if os.path.isdir(d)]
    steps = ["mount -n --rbind / /", "mount -n -o remount,bind,ro /"]
    if interpreter:
        steps.append(f"mount -n --bind {q(interpreter)} {q(stub)}")
    steps += [f"mount -n -t tmpfs -o mode=0755 tmpfs {d}" for d in homes]
    if interpreter:
        steps += [f"mkdir -p {q(interpreter)}", f"mount -n --move {q(stub)} {q(interpreter)}",
                  f"mount -n -o remount,bind,ro {q(interpreter)}"]
    steps += [f"mount -n -o remount,ro {d}" for d in homes]
    steps += [f"mount -n --bind {q(data_dir)} {q(data_dir)}",
              f"mount -n -o remount,bind,rw {q(data_dir)}",
              f"exec setpriv --reuid={SANDBOX_UID} --regid={SANDBOX_UID} --clear-groups "
              '--no-new-privs --bounding-set=-all --inh-caps=-all -- "$@"']
    return [tool("unshare"), "--mount", "--propagation", "private", "sh", "-c",
            " && ".join(steps), "sandbox"]


class UnitReplica(ReplicaProcess):
    """A replica started as its unit starts it: the unit's ExecStart=, the
    unit's Environment=, NOTIFY_SOCKET, optionally inside the sandbox."""

    def __init__(self, cluster: ReplicaCluster, spec: dict, notify_path: str,
                 sandboxed: bool = False) -> None:
        super().__init__(cluster, spec)
        self.notify_path = notify_path
        self.sandboxed = sandboxed

    def argv(self) -> list[str]:
        command = exec_start("tarefa-replica@.service", self.cluster.config_path, self.id)
        if not self.sandboxed:
            return command
        return [*sandbox(self.cluster.data_dir(self), stub_dir(self.cluster)), *command]

    def start(self) -> None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "NOTIFY_SOCKET": self.notify_path}
        env.update(kv.split("=", 1) for kv in
                   shlex.split(setting("tarefa-replica@.service", "Environment")))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd="/", env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def unit_cluster(request):
    """A 3-replica cluster whose replica-3 runs as its unit would; work dir
    readable by the sandbox's unprivileged uid (pytest's tmp_path is not)."""
    workdir = tempfile.mkdtemp(prefix="tarefa-systemd-")
    os.chmod(workdir, 0o755)
    cluster = ReplicaCluster(workdir)
    os.mkdir(stub_dir(cluster))
    notify = NotifySocket(os.path.join(workdir, "notify"))

    def make(sandboxed: bool) -> tuple[ReplicaCluster, UnitReplica, NotifySocket]:
        member = UnitReplica(cluster, cluster.specs[2], notify.path, sandboxed)
        cluster.members[2] = member
        if sandboxed:  # what StateDirectory= does for the unit's User=
            data = cluster.data_dir(member)
            os.makedirs(data, mode=0o750)
            os.chown(data, SANDBOX_UID, SANDBOX_UID)
        return cluster, member, notify

    yield make
    cluster.stop()
    notify.close()
    if failed(request):
        print(cluster.dump_logs())
    shutil.rmtree(workdir, ignore_errors=True)


def serving_now(member: ReplicaProcess) -> None:
    """One immediate health check and Status call, no retry, no wait_for_ready."""
    health = health_pb2_grpc.HealthStub(member.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert member.status(timeout=2).id == member.id


def write_and_converge(cluster: ReplicaCluster) -> int:
    cid = str(int(time.time() * 1e6))
    command = pb.Command(request_id=new_request_id(), op=pb.CREATE_CLIENT, cid=cid, data="{}")
    apply_with_retry(cluster, command, deadline=time.monotonic() + WAIT)
    return cluster.wait_converged(WAIT)


def stop_and_expect_stopping(member: UnitReplica, notify: NotifySocket) -> None:
    member.signal(signal.SIGTERM)
    note = notify.wait_for("STOPPING=1")
    assert note.pid == member.proc.pid
    assert member.proc.wait(WAIT) == 0, member.logs()[-3000:]


def test_replica_notifies_ready_only_once_it_serves(unit_cluster):
    cluster, member, notify = unit_cluster(sandboxed=False)
    member.start()
    ready = notify.wait_for("READY=1")
    # Probed at once: had READY=1 come before the gRPC port was bound, this
    # would be refused instead of answered.
    serving_now(member)
    assert ready.pid == member.proc.pid, "NotifyAccess=main: the main PID must notify"
    assert ready.fields.get("STATUS") == "serving"
    assert [n.fields for n in notify.received] == [ready.fields], "READY=1 came first"
    for other in cluster.members[:2]:
        other.start()
    cluster.wait_leader(WAIT)
    write_and_converge(cluster)
    stop_and_expect_stopping(member, notify)


def test_replica_runs_in_the_units_sandbox(unit_cluster):
    need_root("emulating the units' sandbox (mount namespace, setpriv)")
    cluster, member, notify = unit_cluster(sandboxed=True)
    data = cluster.data_dir(member)

    # The emulation itself: only the data directory is writable, as nobody.
    probe = textwrap.dedent("""\
        import os, sys
        for path in sys.argv[1:]:
            name = os.path.join(path, f".tarefa-probe-{os.getpid()}")
            try:
                open(name, "x").close()
                os.unlink(name)
                print(path, "writable")
            except OSError as exc:
                print(path, os.strerror(exc.errno))
        print("uid", os.getuid())
        """)
    python = os.path.join(ROOT, ".venv", "bin", "python")
    places = [data, cluster.workdir, "/tmp", "/var/tmp", "/etc", ROOT]
    checked = subprocess.run([*sandbox(data, stub_dir(cluster)), python, "-c", probe, *places],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    rofs = os.strerror(errno.EROFS)
    assert checked.stdout.splitlines() == [f"{data} writable"] + [
        f"{place} {rofs}" for place in places[1:]] + [f"uid {SANDBOX_UID}"]

    member.start()
    ready = notify.wait_for("READY=1")
    serving_now(member)
    assert (ready.pid, ready.uid) == (member.proc.pid, SANDBOX_UID)
    for other in cluster.members[:2]:
        other.start()
    cluster.wait_leader(WAIT)
    applied = write_and_converge(cluster)
    stop_and_expect_stopping(member, notify)

    # What Restart=on-failure relies on: it reopens its state under the sandbox.
    member.start()
    notify.wait_for("READY=1")
    serving_now(member)
    assert write_and_converge(cluster) > applied
    owners = {os.stat(os.path.join(d, f)).st_uid
              for d, _, files in os.walk(data) for f in files}
    assert owners == {SANDBOX_UID}, "every state file belongs to the unit's user"
    stop_and_expect_stopping(member, notify)


# ---- install-units.sh ------------------------------------------------------


def install_units(root: str, *args: str, user: int | None = None) -> subprocess.CompletedProcess:
    script = os.path.join(UNIT_DIR, "install-units.sh")
    prefix = [tool("setpriv"), f"--reuid={user}", f"--regid={user}", "--clear-groups"] \
        if user is not None else []
    return subprocess.run([*prefix, script, "--root", root, *args], capture_output=True,
                          text=True, timeout=120)


def test_install_units_refuses_without_root(tmp_path):
    result = install_units(str(tmp_path / "root"), user=SANDBOX_UID) if os.geteuid() == 0 \
        else install_units(str(tmp_path / "root"))
    assert result.returncode == 1
    assert "must be run as root" in result.stderr
    assert not (tmp_path / "root").exists()


def test_install_units_stages_user_units_config_and_enables_local_daemons(tmp_path):
    need_root("install-units.sh")
    tool("systemd-sysusers")
    tool("systemctl")
    root = tmp_path / "root"
    staged_mosquitto_user(root)
    first = install_units(str(root), "--enable")
    assert first.returncode == 0, first.stdout + first.stderr

    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").open()}
    assert passwd["tarefa"][6].strip() == "/usr/sbin/nologin"
    gid = int(passwd["tarefa"][3])
    for name in UNITS:
        assert (root / "etc/systemd/system" / name).read_text() == unit_text(name)
    config = root / "etc/tarefa/cluster.yaml"
    assert config.read_text() == unit_text("cluster.one-host.yaml")
    for path, mode in ((config, 0o640), (config.parent, 0o750)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, gid), path
    wants = sorted(os.listdir(root / "etc/systemd/system/tarefa.target.wants"))
    one_host = load_cluster(os.path.join(UNIT_DIR, "cluster.one-host.yaml"))
    assert wants == sorted([f"tarefa-replica@{r.id}.service" for r in one_host.replicas]
                           + [f"tarefa-portal@{p.id}.service" for p in one_host.portals]
                           + ["tarefa-listener.service"])
    assert (root / "etc/systemd/system/multi-user.target.wants/tarefa.target").is_symlink()
    check_secrets(root)
    check_mosquitto(root, MOSQUITTO_UID, MOSQUITTO_UID)

    # Re-running is safe and never overwrites the operator's cluster file.
    config.write_text(config.read_text().replace("name: tarefa", "name: edited"))
    again = install_units(str(root), "--enable")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "name: edited" in config.read_text()

    # One file for several hosts: only the daemons whose host is local are enabled.
    multi = unit_text("cluster.multi-host.yaml")
    local = re.sub(r"192\.0\.2\.11\b", "127.0.0.1", multi)
    other = tmp_path / "other"
    (other / "etc/tarefa").mkdir(parents=True)
    (other / "etc/tarefa/cluster.yaml").write_text(local)
    third = install_units(str(other), "--enable")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "no mosquitto user" in third.stdout, "no Debian mosquitto in that root"
    assert not (other / "etc/mosquitto").exists()

    # The other hosts get a copy of the secrets without the CA key: accepted
    # while every certificate is there, refused (naming it) once one is not.
    tls = other / "etc/tarefa/secrets/tls"
    (tls / "ca.key").unlink()
    copied = install_units(str(other))
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert not (tls / "ca.key").exists() and "without its key" in copied.stderr
    (tls / "replica-2.key").unlink()
    lacking = install_units(str(other))
    assert lacking.returncode == 1 and "replica-2.key missing" in lacking.stderr
    shutil.rmtree(tls)
    remade = install_units(str(other))
    assert remade.returncode == 0 and (tls / "ca.key").exists(), remade.stderr
    assert sorted(os.listdir(other / "etc/systemd/system/tarefa.target.wants")) == [
        "tarefa-listener.service", "tarefa-portal@portal-admin.service",
        "tarefa-replica@replica-1.service"]

    # Certificates name their daemon's host: changing it in the cluster file
    # without making new ones is refused, naming the files to delete.
    (other / "etc/tarefa/cluster.yaml").write_text(multi)
    stale = install_units(str(other))
    assert stale.returncode == 1 and "replica-1.crt does not name 192.0.2.11" in stale.stderr
    shutil.rmtree(other / "etc/tarefa/secrets/tls")

    # A host named by no daemon is refused rather than silently enabling nothing.
    nothing = install_units(str(other), "--enable")
    assert nothing.returncode == 1 and "no daemon" in nothing.stderr


# ---- install-units.sh: secrets and Mosquitto ------------------------------

MOSQUITTO_UID = 4242  # the staged root's mosquitto user, unless the host's is used


def staged_mosquitto_user(root, line: str | None = None) -> int:
    """Give a staged root the mosquitto user Debian's package creates (before
    install-units.sh runs: systemd-sysusers then adds tarefa to the file)."""
    line = line or f"mosquitto:x:{MOSQUITTO_UID}:{MOSQUITTO_UID}::/var/lib/mosquitto:" \
                   "/usr/sbin/nologin"
    uid, gid = int(line.split(":")[2]), int(line.split(":")[3])
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(line.strip() + "\n")
    (root / "etc/group").write_text(f"mosquitto:x:{gid}:\n")
    return uid


def staged_ids(root) -> tuple[int, int]:
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").open()}
    return int(passwd["tarefa"][2]), int(passwd["tarefa"][3])


def owner_mode(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def mosquitto_conf(root) -> dict[str, str]:
    lines = (root / "etc/mosquitto/conf.d/tarefa.conf").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))


def test_install_units_makes_secrets_the_daemons_and_mosquitto_can_read():
    need_root("install-units.sh")
    tool("systemd-sysusers")
    # Under /tmp with mode 0755 (pytest's tmp_path is root-only): the staged
    # tarefa and mosquitto users must be able to walk to their files.
    workdir = tempfile.mkdtemp(prefix="tarefa-install-")
    os.chmod(workdir, 0o755)
    root = pathlib.Path(workdir) / "root"
    try:
        host_mosquitto = subprocess.run(["getent", "passwd", "mosquitto"], capture_output=True,
                                        text=True, timeout=30).stdout
        assert host_mosquitto, "Debian's mosquitto package is missing: run ./install.sh"
        mosquitto_uid = staged_mosquitto_user(root, host_mosquitto)
        mosquitto_gid = int(host_mosquitto.split(":")[3])
        first = install_units(str(root))
        assert first.returncode == 0, first.stdout + first.stderr
        check_secrets(root, as_tarefa=True)
        check_mosquitto(root, mosquitto_uid, mosquitto_gid)
        check_daemons_accept_the_staged_file(root)

        # Re-running keeps every secret, and refreshes Mosquitto's copies from
        # the per-daemon passwords (the source of truth): rotate one login.
        mqtt = root / "etc/tarefa/secrets/mqtt"
        secrets_before = {p: p.read_bytes() for p in (root / "etc/tarefa/secrets").rglob("*")
                          if p.is_file()}
        copy = root / "etc/mosquitto/tarefa.passwd"
        copy.chmod(0o644)
        unchanged = install_units(str(root))
        assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
        assert {p: p.read_bytes() for p in secrets_before} == secrets_before
        assert owner_mode(copy) == (mosquitto_uid, mosquitto_gid, 0o600), "mode restored"
        old_copy = copy.read_bytes()
        (mqtt / "portal-admin").unlink()
        rotated = install_units(str(root))
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert copy.read_bytes() != old_copy
        assert copy.read_bytes() == (mqtt / "mosquitto.passwd").read_bytes()
        check_secrets(root, as_tarefa=True)
        check_mosquitto(root, mosquitto_uid, mosquitto_gid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_secrets(root, as_tarefa: bool = False) -> None:
    """Owners and modes of every secret; with as_tarefa (root must then be
    reachable by others) also that the daemons' user reads them."""
    uid, gid = staged_ids(root)
    secrets = root / "etc/tarefa/secrets"
    cluster = load_cluster(str(root / "etc/tarefa/cluster.yaml"))
    assert cluster.security.tls is not None and cluster.broker.password_dir is not None
    assert cluster.security.tls.cert_dir == "/etc/tarefa/secrets/tls"
    assert cluster.broker.password_dir == "/etc/tarefa/secrets/mqtt"
    for directory in (secrets, secrets / "tls", secrets / "mqtt"):
        assert owner_mode(directory) == (0, gid, 0o750), directory
    daemons = [r.id for r in cluster.replicas] + [p.id for p in cluster.portals] + ["listener"]
    readable = [secrets / "admin.token", secrets / "raft.password"]
    readable += [secrets / "tls" / f"{d}.key" for d in [*daemons, "tarefa"]]
    readable += [secrets / "mqtt" / d for d in daemons if not d.startswith("replica-")]
    readable += [secrets / "mqtt" / "mosquitto.passwd", secrets / "mqtt" / "mosquitto.acl"]
    for path in readable:
        assert owner_mode(path) == (uid, gid, 0o600), path
    for path in [secrets / "tls/ca.crt", *(secrets / "tls" / f"{d}.crt" for d in daemons)]:
        assert owner_mode(path) == (uid, gid, 0o644), path
    assert owner_mode(secrets / "tls/ca.key") == (0, 0, 0o600), "the CA key is root's only"
    assert not list(secrets.glob("mqtt/replica-*")), "replicas do not use MQTT"
    assert not list((root / "etc/tarefa").glob(".cluster.secrets.*")), "temporary copy left"

    if not as_tarefa:
        return
    # As the daemons' user: every secret reads, the CA key does not.
    as_user = [tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "cat"]
    read = subprocess.run([*as_user, *map(str, readable)], capture_output=True, text=True,
                          timeout=30)
    assert read.returncode == 0, read.stderr
    refused = subprocess.run([*as_user, str(secrets / "tls/ca.key")], capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr


def check_mosquitto(root, uid: int, gid: int) -> None:
    conf = mosquitto_conf(root)
    assert conf == {"listener": "1883 127.0.0.1", "allow_anonymous": "false",
                    "password_file": "/etc/mosquitto/tarefa.passwd",
                    "acl_file": "/etc/mosquitto/tarefa.acl",
                    "max_queued_messages": "1000000"}
    mqtt = root / "etc/tarefa/secrets/mqtt"
    for key, source in (("password_file", "mosquitto.passwd"), ("acl_file", "mosquitto.acl")):
        copy = root / conf[key].lstrip("/")
        assert copy.read_bytes() == (mqtt / source).read_bytes(), copy
        assert owner_mode(copy) == (uid, gid, 0o600), copy


def check_daemons_accept_the_staged_file(root) -> None:
    """--check-config of every daemon on the staged file, its /etc/tarefa paths
    moved under the staged root (the secrets are there, not in /etc)."""
    staged = root / "etc/tarefa/cluster.yaml"
    moved = root / "etc/tarefa/cluster.rooted.yaml"
    moved.write_text(staged.read_text().replace("/etc/tarefa/", f"{root}/etc/tarefa/"))
    moved.chmod(0o600)
    cluster = load_cluster(str(moved))
    assert cluster.security.admin_token_file == f"{root}/etc/tarefa/secrets/admin.token"
    bin_dir = os.path.join(ROOT, ".venv", "bin")
    for argv in ([f"{bin_dir}/tarefa-replica", "--id", cluster.replicas[0].id],
                 [f"{bin_dir}/tarefa-portal", "--id", cluster.portals[0].id],
                 [f"{bin_dir}/tarefa-listener"]):
        check = subprocess.run([*argv, "--config", str(moved), "--check-config"],
                               capture_output=True, text=True, timeout=60, cwd="/")
        assert check.returncode == 0, f"{argv}\n{check.stdout}{check.stderr}"
    moved.unlink()


def test_staged_mosquitto_config_lets_each_daemon_in_and_nobody_else():
    """The snippet and the copies, as Debian's Mosquitto reads them: started as
    root, it drops to the mosquitto user before opening the password file."""
    need_root("install-units.sh")
    mosquitto = "/usr/sbin/mosquitto"
    assert os.access(mosquitto, os.X_OK), "Debian's mosquitto package is missing: ./install.sh"
    workdir = tempfile.mkdtemp(prefix="tarefa-mosquitto-")
    os.chmod(workdir, 0o755)
    root = pathlib.Path(workdir) / "root"
    broker = None
    try:
        host_mosquitto = subprocess.run(["getent", "passwd", "mosquitto"], capture_output=True,
                                        text=True, timeout=30).stdout
        assert host_mosquitto, "Debian's mosquitto package is missing: run ./install.sh"
        staged_mosquitto_user(root, host_mosquitto)
        done = install_units(str(root))
        assert done.returncode == 0, done.stdout + done.stderr
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = mosquitto_conf(root)
        test_conf = pathlib.Path(workdir) / "mosquitto.conf"
        test_conf.write_text("".join(
            f"{key} {value.replace('/etc/', f'{root}/etc/')}\n" for key, value in conf.items()
            if key != "listener") + f"listener {port} 127.0.0.1\nlog_dest stderr\n")
        log = open(pathlib.Path(workdir) / "mosquitto.log", "wb")
        broker = subprocess.Popen([mosquitto, "-c", str(test_conf)], stdout=log,
                                  stderr=subprocess.STDOUT)
        password = (root / "etc/tarefa/secrets/mqtt/portal-admin").read_text().strip()
        deadline = time.monotonic() + WAIT
        while mqtt_connack(port, "portal-admin", password) is None:
            assert broker.poll() is None, (pathlib.Path(workdir) / "mosquitto.log").read_text()
            assert time.monotonic() < deadline, "Mosquitto did not start"
            time.sleep(0.2)
        assert mqtt_connack(port, "portal-admin", password) == 0
        assert mqtt_connack(port, "portal-admin", "wrong") not in (0, None)
        assert mqtt_connack(port, None, None) not in (0, None), "anonymous refused"
    finally:
        if broker is not None:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def mqtt_connack(port: int, user: str | None, password: str | None) -> int | None:
    """The CONNACK reason code, or None if nothing listens yet."""
    import paho.mqtt.client as mqtt

    answers: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{os.getpid()}")
    if user is not None:
        client.username_pw_set(user, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason.value)
    try:
        client.connect("127.0.0.1", port, keepalive=5)
    except OSError:
        return None
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.disconnect()
    return answers[0] if answers else None
