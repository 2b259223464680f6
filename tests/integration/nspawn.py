"""A real Debian systemd booted as PID 1 in a systemd-nspawn container, for
tests/integration/test_systemd_boot.py.

What it owns:

- the Debian root file system the container boots (`cached_rootfs`):
  debootstrap'ed once with systemd, Mosquitto, python3-venv and this host's
  CA certificates (pip goes through the host's proxy), then kept under
  TAREFA_SYSTEMD_ROOT for later runs. It is built in a sibling directory and
  renamed into place only when complete, so an interrupted build is never
  reused;
- one container per test (`Container`): the cached tree is the read-only
  lower layer of an overlay whose upper layer is in the test's directory, so
  no run changes the cache; the checkout is overlaid at /opt/tarefa the same
  way, so the container never writes into it.

Every mount is made inside a private mount namespace (`unshare --mount`) that
ends with the process using it: nothing is ever mounted in the caller's
namespace, so nothing can stay mounted after a crash, and deleting a
directory never descends into a mounted /proc or /dev. The container has a
private network namespace (only its own loopback). Processes are tracked and
killed by PID only.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

DEFAULT_CACHE = "/var/tmp/tarefa-nspawn-root"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd and dbus to boot; python3 for the .venv; what ./install.sh would
# otherwise apt-get on every run; ca-certificates for the host's proxy CA.
PACKAGES = ("systemd", "dbus", "python3", "python3-venv", "mosquitto", "ca-certificates")
# Written last into a finished tree; a tree without it is never used.
COMPLETE = "etc/tarefa-test-rootfs"
HOST_CA_DIR = "/usr/local/share/ca-certificates"
# The environment of every command run in the chroot or the container: none
# of the caller's (a pyenv PATH, PYTHONPATH or pip settings naming host paths).
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


class CannotBoot(Exception):
    """This machine cannot run the container; the message says why."""


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ {shlex.join(self.argv)}\nexit {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None,
        log: str | None = None) -> Result:
    """Run argv to completion within `timeout` seconds (killed after it)."""
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                              errors="replace")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise TimeoutError(f"timed out after {timeout}s: {shlex.join(argv)}\n{out}{err}") from None
    result = Result(argv, done.returncode, done.stdout, done.stderr)
    if log is not None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(result.describe() + "\n")
    return result


def chroot_env(**extra: str) -> dict[str, str]:
    env = dict(BASE_ENV)
    env.update({k: v for k, v in os.environ.items() if k in PROXY_VARS})
    env.update(extra)
    return env


# ---- the host ---------------------------------------------------------------


def require_host(log: str) -> None:
    """Root, and systemd-nspawn plus debootstrap (installed with apt-get if missing)."""
    if os.geteuid() != 0:
        raise CannotBoot("booting a container needs root (debootstrap, mounts, systemd-nspawn)")
    for tool in ("unshare", "nsenter", "mount", "chroot"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} not found (Debian's util-linux / coreutils)")
    missing = [pkg for tool, pkg in (("systemd-nspawn", "systemd-container"),
                                     ("debootstrap", "debootstrap")) if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise CannotBoot(f"{' '.join(missing)} missing and apt-get not found to install them")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([*apt, "update"], [*apt, "install", "-y", *missing]):
        result = run(argv, timeout=900, env=env, log=log)
        if result.returncode != 0:
            raise CannotBoot(f"could not install {' '.join(missing)}:\n{result.describe()}")


# ---- the cached root file system --------------------------------------------


def cached_rootfs(path: str, log: str) -> str:
    """The finished Debian tree at `path`, built first if there is none."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    if os.path.lexists(path):
        raise CannotBoot(f"{path} exists but is no finished root file system (no {COMPLETE}): "
                         f"delete it (rm -rf {path}) to have it built again")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_abandoned_builds(path)
    building = f"{path}.building-{os.getpid()}"
    try:
        build_rootfs(building, log)
        os.rename(building, path)  # atomic: the tree appears complete or not at all
    finally:
        if os.path.lexists(building):
            shutil.rmtree(building, ignore_errors=True)
    return path


def remove_abandoned_builds(path: str) -> None:
    """Trees of interrupted builds (their builder's PID is gone). Safe to delete:
    builds mount nothing outside private namespaces."""
    for stale in glob.glob(glob.escape(path) + ".building-*"):
        pid = stale.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(stale, ignore_errors=True)


def build_rootfs(target: str, log: str) -> None:
    result = run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  SUITE, target, MIRROR], timeout=900, env={**os.environ, **BASE_ENV}, log=log)
    if result.returncode != 0:
        raise CannotBoot(f"debootstrap failed (see {log}):\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    # pip in the chroot reaches PyPI through this host's TLS proxy, if any:
    # trust the same extra CAs (update-ca-certificates adds them to the bundle).
    dest = os.path.join(target, HOST_CA_DIR.lstrip("/"))
    os.makedirs(dest, exist_ok=True)
    for cert in glob.glob(os.path.join(HOST_CA_DIR, "**", "*.crt"), recursive=True):
        shutil.copy(cert, dest)
    script = """
        mount -t proc proc "$ROOT/proc"
        chroot "$ROOT" update-ca-certificates
        chroot "$ROOT" apt-get clean
    """
    result = in_private_mounts(script, {"ROOT": target}, timeout=300, log=log)
    if result.returncode != 0:
        raise CannotBoot(f"preparing the root file system failed:\n{result.describe()}")
    with open(os.path.join(target, COMPLETE), "w", encoding="utf-8") as fh:
        fh.write(f"Debian {SUITE} for tests/integration/test_systemd_boot.py: {' '.join(PACKAGES)}\n")


def in_private_mounts(script: str, variables: dict[str, str], timeout: float,
                      log: str) -> Result:
    """Run a shell script in a new, private mount namespace: whatever it mounts
    is gone when it exits, however it exits."""
    env = chroot_env(**variables)
    return run(["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-euc", script], timeout=timeout, env=env, log=log)


# ---- one container ----------------------------------------------------------


class Container:
    """A booted Debian on an overlay of the cached tree, the checkout at /opt/tarefa.

    Per-run state (overlay upper and work directories, logs) lives in
    `workdir`. `start()` boots; `stop()` powers off and then makes sure, by
    PID, that nothing of the container is left; it is safe to call twice.
    """

    def __init__(self, rootfs: str, checkout: str, workdir: str, name: str) -> None:
        self.rootfs = rootfs
        self.checkout = checkout
        self.workdir = workdir
        self.name = name
        self.log = os.path.join(workdir, "commands.log")
        self.console_log = os.path.join(workdir, "console.log")
        self.root_upper = os.path.join(workdir, "root-upper")
        self.root_work = os.path.join(workdir, "root-work")
        self.merged = os.path.join(workdir, "root")
        self.code_upper = os.path.join(workdir, "tarefa-upper")
        self.code_work = os.path.join(workdir, "tarefa-work")
        for directory in (self.root_upper, self.root_work, self.merged, self.code_upper,
                          self.code_work):
            os.makedirs(directory, exist_ok=True)
        # An overlay's top directory takes the upper layer's owner and mode: the
        # container's / and /opt/tarefa must be enterable by the tarefa user.
        os.chmod(self.root_upper, 0o755)
        os.chmod(self.code_upper, 0o755)
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self.cgroups_before = set(nspawn_cgroups())

    def _mount_root(self) -> str:
        return ('mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK" '
                '"$MERGED"\n')

    def _variables(self) -> dict[str, str]:
        return {"LOWER": self.rootfs, "UPPER": self.root_upper, "WORK": self.root_work,
                "MERGED": self.merged, "CODE": self.checkout, "CODE_UPPER": self.code_upper,
                "CODE_WORK": self.code_work, "NAME": self.name}

    def chroot(self, argv: list[str], env: dict[str, str], timeout: float) -> Result:
        """Run argv chrooted into the (not booted) tree, with the host's network,
        /proc, /dev and the checkout at /opt/tarefa."""
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        script = self._mount_root() + f"""
            mkdir -p "$MERGED/opt/tarefa"
            mount -t overlay overlay \
                -o "lowerdir=$CODE,upperdir=$CODE_UPPER,workdir=$CODE_WORK" "$MERGED/opt/tarefa"
            mount -t proc proc "$MERGED/proc"
            mount --rbind /dev "$MERGED/dev"
            cp -L /etc/resolv.conf "$MERGED/etc/resolv.conf"
            exec chroot "$MERGED" env -i {assignments} {shlex.join(argv)}
        """
        return in_private_mounts(script, self._variables(), timeout, self.log)

    def start(self, timeout: float) -> str:
        """Boot; return `systemctl is-system-running --wait` once boot finished."""
        script = self._mount_root() + """
            exec systemd-nspawn --directory="$MERGED" --machine="$NAME" --boot \
                --register=no --keep-unit --private-network --console=passive \
                --overlay="$CODE:$CODE_UPPER:/opt/tarefa"
        """
        # Its own session: a Ctrl-C at the terminal reaches pytest, not systemd.
        # unshare and sh exec: this PID is systemd-nspawn's.
        with open(self.console_log, "ab") as console:
            self.nspawn = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-euc", script],
                env=chroot_env(**self._variables()), stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.nspawn.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited {self.nspawn.returncode} before "
                                 f"the container's systemd started:\n{self.console()}")
            if time.monotonic() > deadline:
                raise CannotBoot(f"no systemd in the container after {timeout}s:\n"
                                 f"{self.console()}")
            self.leader = child_named(self.nspawn.pid, "systemd")
            time.sleep(0.1)
        # systemctl answers once PID 1 serves its private bus socket; until then
        # it prints nothing and exits 1 ("Failed to connect to bus").
        state: Result | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.nspawn.poll() is not None:
                last = state.describe() if state else "(systemctl never ran)"
                raise CannotBoot(f"the container's systemd did not answer within {timeout}s:\n"
                                 f"{last}\n{self.console()}")
            state = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
            if state.stdout.strip():
                break
            time.sleep(0.2)
        if state.stdout.strip() not in ("running", "degraded"):
            raise CannotBoot(f"the container did not finish booting:\n{state.describe()}\n"
                             f"{self.console()}")
        return state.stdout.strip()

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Result:
        """Run argv inside the booted container (all its namespaces, its root)."""
        assert self.leader is not None, "container not started"
        variables = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
        return run(["nsenter", "--target", str(self.leader), "--all", "env", "-i", *variables,
                    *argv], timeout=timeout, log=self.log)

    def console(self) -> str:
        try:
            with open(self.console_log, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-6000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> list[str]:
        """Power off; kill by PID what did not stop; remove nspawn's cgroups.
        Returns what went wrong (empty: a clean poweroff)."""
        problems: list[str] = []
        proc = self.nspawn
        if proc is not None and proc.poll() is None:
            if self.leader is not None:
                try:
                    off = self.run(["systemctl", "poweroff"], timeout=30)
                    if off.returncode != 0:
                        problems.append(off.describe())
                except TimeoutError as exc:
                    problems.append(str(exc))
            else:
                proc.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"systemd-nspawn (PID {proc.pid}) still ran {timeout}s "
                                f"after poweroff: killed")
                # The leader is the container's PID 1: killing it ends every
                # process of its PID namespace.
                for pid in (self.leader, proc.pid):
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                proc.wait(30)
        if self.leader is not None and os.path.exists(f"/proc/{self.leader}"):
            problems.append(f"the container's systemd (PID {self.leader}) outlived nspawn")
        self.nspawn = None
        left_behind = set(nspawn_cgroups()) - self.cgroups_before
        problems += remove_cgroups(left_behind)
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"stopped; cgroups removed: {sorted(left_behind)}; problems: {problems}\n")
        return problems


def child_named(parent: int, comm: str) -> int | None:
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        if ppid == parent and name == comm:
            return int(text.split()[0])
    return None


# The cgroups systemd-nspawn makes under its own (with --keep-unit and no
# systemd on the host, the root of each hierarchy) and leaves behind.
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
CGROUP_NAMES = ("payload", "supervisor")


def nspawn_cgroups() -> list[str]:
    found = []
    for base in CGROUP_ROOTS:
        for name in CGROUP_NAMES:
            path = os.path.join(base, name)
            if os.path.isfile(os.path.join(path, "cgroup.procs")):
                found.append(path)
    return found


def remove_cgroups(paths: set[str]) -> list[str]:
    """rmdir each cgroup tree bottom-up (cgroupfs: only empty groups, no rm -r)."""
    problems = []
    for top in sorted(paths):
        for directory, _subdirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(directory)
            except OSError as exc:
                problems.append(f"cgroup {directory} not removed: {exc}")
    return problems
