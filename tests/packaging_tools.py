"""Helpers for the packaging tests: build the .deb, read the unit, run podman.

Everything here runs real system tools as root; tests/test_packaging.py says when.
"""
import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "ollama-gw.service"
BUILD_TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "lintian", "setpriv")
CONTAINER_TOOLS = ("podman", "debootstrap", "runc")
# Debian's own tools only: no virtualenv or pyenv of the caller (the package must be
# built with /usr/bin/python3 whatever `python3` is first on the caller's PATH).
SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


def have(tools):
    """Whether every one of `tools` is on a plain root shell's PATH."""
    return all(shutil.which(tool, path=SYSTEM_PATH) for tool in tools)


def system_env(**extra):
    """The environment of a root shell on a plain Debian machine, plus `extra`."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "http_proxy", "https_proxy")}
    return {**keep, "PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive", **extra}


def run(args, timeout=600, check=True, **kwargs):
    """Run a command with no stdin; on failure raise with its output."""
    kwargs.setdefault("env", system_env())
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def stage_source(destination):
    """Copy the files git knows (tracked, or new and not ignored) into `destination`."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=REPO).stdout
    destination.mkdir(parents=True)
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() or source.is_symlink():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return destination


def bump_version(tree, version, note):
    """Make the source tree in `tree` a newer release: setup.cfg and debian/changelog."""
    setup = tree / "setup.cfg"
    text = setup.read_text()
    current = next(line for line in text.splitlines() if line.startswith("version = "))
    setup.write_text(text.replace(current, f"version = {version}", 1))
    changelog = tree / "debian" / "changelog"
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    changelog.write_text(
        f"ollama-gw ({version}) unstable; urgency=medium\n\n  * {note}\n\n"
        f" -- ollama-gw tests <tests@ollama-gw.invalid>  {stamp}\n\n" + changelog.read_text())


def build_deb(tree):
    """dpkg-buildpackage in `tree`; return the path of the .deb it wrote next to it."""
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, timeout=900)
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree).stdout.strip()
    arch = run(["dpkg-architecture", "-qDEB_HOST_ARCH"]).stdout.strip()
    deb = tree.parent / f"ollama-gw_{version}_{arch}.deb"
    assert deb.is_file(), f"no {deb.name} after the build"
    return deb


# The slow preparations (two .deb builds, a Debian root file system), started once per
# session in the background as soon as the tests that need them are collected
# (tests/conftest.py): they are mostly waiting on pip, dpkg and the mirror, and the
# rest of the suite runs meanwhile. Their tests run last and wait for the results.
# Under pytest-xdist every worker is a process of its own and starts them too: the first
# to claim the session's shared directory builds, and the others wait for its results.
_pool = concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="packaging-prep")
_started = {}
_builder = None  # whether this process builds; decided at the first preparation
DEBIAN_MIRROR = "http://deb.debian.org/debian"
RESULT_DEADLINE = 3600  # seconds a worker waits for another worker's build


def _shared_dir(tmp_path_factory):
    """A directory of this session that all its xdist workers see (each has its own basetemp)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "packaging-prep"
    shared.mkdir(exist_ok=True)
    return shared


def _claim(shared):
    try:
        os.close(os.open(shared / "builder", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _publish(path, future):
    """Write a finished build's result where the other workers wait for it."""
    error = future.exception()
    record = ({"error": f"{type(error).__name__}: {error}"} if error
              else {"path": str(future.result())})
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)


class _Elsewhere:
    """A preparation another worker of this session runs: `result()` waits for it."""

    def __init__(self, path):
        self.path = path

    def result(self):
        wait_for(self.path.exists, RESULT_DEADLINE, f"{self.path.name} from the building worker",
                 interval=1)
        record = json.loads(self.path.read_text())
        if "error" in record:
            raise AssertionError(f"the build in another worker failed: {record['error']}")
        return Path(record["path"])


def _once(name, tmp_path_factory, work):
    """Start `work(tmp_path_factory)` once per session, in whichever process claims it."""
    global _builder
    if name not in _started:
        shared = _shared_dir(tmp_path_factory)
        if _builder is None:
            _builder = _claim(shared)
        if _builder:
            future = _pool.submit(work, tmp_path_factory)
            future.add_done_callback(lambda done: _publish(shared / f"{name}.json", done))
            _started[name] = future
        else:
            _started[name] = _Elsewhere(shared / f"{name}.json")
    return _started[name]


def finish_builds(timeout=RESULT_DEADLINE):
    """Wait for this process's builds: other workers may be waiting for their results."""
    concurrent.futures.wait(
        [f for f in _started.values() if isinstance(f, concurrent.futures.Future)], timeout)


def start_current_deb(tmp_path_factory):
    return _once("current", tmp_path_factory,
                 lambda tmp: build_deb(stage_source(tmp.mktemp("deb") / "ollama-gw")))


def current_deb(tmp_path_factory):
    """This tree's .deb, built once per test session for every module that needs it."""
    return start_current_deb(tmp_path_factory).result()


def start_later_deb(tmp_path_factory):
    """The same tree one release later, with one more migration: for the upgrade test."""

    def build(tmp):
        later = stage_source(tmp.mktemp("deb-later") / "ollama-gw")
        version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=later).stdout.strip()
        bump_version(later, f"{version}+upgrade1", "Packaging test: an upgrade with a migration.")
        (later / "migrations" / "9999_upgrade_probe.py").write_text(
            "def up(migrator, db):\n    db.execute_sql('CREATE TABLE upgrade_probe (id INTEGER)')"
            "\n\n\ndef down(migrator, db):\n    db.execute_sql('DROP TABLE upgrade_probe')\n")
        return build_deb(later)

    return _once("later", tmp_path_factory, build)


def start_debian_rootfs(tmp_path_factory):
    """A minimal Debian 12 as a tar archive, made by debootstrap from Debian's packages."""

    def make(tmp):
        # A directory debootstrap creates: mktemp's is 0700, and as the image's / it would
        # shut every non-root user (dbus, the gateway) out of the whole file system.
        root = tmp.mktemp("rootfs") / "debian"
        run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
            timeout=900)
        archive = root.parent / "rootfs.tar"
        run(["tar", "-C", str(root), "-cf", str(archive), "."], timeout=300)
        shutil.rmtree(root)  # 400 MB that the archive now holds
        return archive

    return _once("rootfs", tmp_path_factory, make)


def apt(*args):
    """apt-get, non-interactive; keeps an edited conffile as a scripted upgrade would."""
    return run(["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *args],
               timeout=600)


def unit_service_section(path=UNIT):
    """The [Service] settings of a unit file: name -> list of values, in order."""
    settings, section, pending = {}, None, ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            name, _, value = line.partition("=")
            settings.setdefault(name.strip(), []).append(value.strip())
    return settings


def environment_file(path):
    """KEY=value pairs of an EnvironmentFile=, as systemd reads them."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def unit_command(service, user_home):
    """(argv, env, cwd, umask, user, group) that systemd would run for ExecStart=."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
    user = service["User"][-1]
    group = service.get("Group", [user])[-1]
    env.update(HOME=user_home, USER=user, LOGNAME=user, SHELL="/usr/sbin/nologin")
    for assignments in service.get("Environment", []):
        for assignment in shlex.split(assignments):
            name, _, value = assignment.partition("=")
            env[name] = value
    for name in service.get("EnvironmentFile", []):
        optional = name.startswith("-")
        path = name.lstrip("-")
        if os.path.exists(path):
            env.update(environment_file(path))
        elif not optional:
            raise AssertionError(f"EnvironmentFile {path} is missing")
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start.lstrip("-@:+!"))
    cwd = service.get("WorkingDirectory", ["/"])[-1].lstrip("-")
    umask = int(service.get("UMask", ["0022"])[-1], 8)
    return argv, env, cwd, umask, user, group


class UnitProcess:
    """The unit's ExecStart=, run as its User= the way systemd would (PID 1 here is not)."""

    def __init__(self, service, user_home, log_path):
        self.argv, self.env, self.cwd, self.umask, self.user, self.group = unit_command(
            service, user_home)
        self.log_path = log_path
        self.proc = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["setpriv", f"--reuid={self.user}", f"--regid={self.group}", "--init-groups",
                 "--", *self.argv],
                env=self.env, cwd=self.cwd, umask=self.umask, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        return self.proc.wait(timeout)

    def kill(self):
        """Stop the whole process group, whatever state it is in."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        else:  # the master is gone; make sure no worker outlived it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(condition, timeout, what, interval=0.2):
    """Poll `condition` until it returns something true; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def healthy(url):
    """True once GET url/health answers 200."""
    try:
        return requests.get(url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


class Podman:
    """podman as it runs in this sandbox: its own storage, runc, no systemd cgroups.

    The flags are what rootful podman needs where the cgroup hierarchy is hybrid and
    root may not raise resource limits; on a normal machine they are harmless.
    """

    def __init__(self, root):
        self.root = Path(root)
        # podman refuses a run root longer than 50 characters, which a pytest basetemp
        # under xdist (/tmp/pytest-of-root/pytest-200/popen-gw0/...) soon is.
        self.runroot = Path(tempfile.mkdtemp(prefix="ogw-podman-"))
        self.base = ["podman", "--root", str(self.root / "storage"),
                     "--runroot", str(self.runroot), "--storage-driver", "vfs",
                     "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file"]
        nofile = 65536
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            nofile = hard if hard != resource.RLIM_INFINITY else nofile
        except (ImportError, ValueError):
            pass
        self.run_flags = ["--network", "host", "--ulimit", f"nofile={nofile}:{nofile}",
                          "--ulimit", "nproc=4096:4096"]

    def __call__(self, *args, timeout=900, check=True):
        return run([*self.base, *args], timeout=timeout, check=check)

    def cleanup(self):
        self("rm", "--all", "--force", "--time", "5", check=False, timeout=120)
        self("rmi", "--all", "--force", check=False, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
