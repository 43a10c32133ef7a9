"""A real gateway for integration tests: `ollama-gw serve` (gunicorn + gevent) in a subprocess.

The machines tests run on are shared and slow down without warning: starting waits on
the gateway's /health with a generous deadline, and a gateway that fails to start is
stopped before the error is raised, so no server outlives its test.
"""
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

from tests import leak_check

START_SECONDS = 90
NAMES_GIVEN = collections.Counter()  # key names add_key was given in this run


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_session(proc):
    """SIGKILL whatever is left of `proc`'s session (a master's workers included), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def wait_for(predicate, seconds, interval=0.05):
    """True as soon as predicate() is, False once `seconds` have passed without it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class GatewayProcess:
    def __init__(self, database_url, upstream, workers=2, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "OLLAMA_URL": upstream,
            "OLLAMA_GW_WORKERS": str(workers),
            "OLLAMA_GW_BIND": f"127.0.0.1:{self.port}",
            # PostgreSQL here takes 100 connections, shared by every suite on the machine:
            # four per worker keep two suites running at once under it.
            "OLLAMA_GW_DATABASE_POOL_SIZE": "4",
            **{f"OLLAMA_GW_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.env.pop("OLLAMA_GW_CONFIG", None)
        # A data directory of its own unless the test names one: the default is shared by
        # every suite on the machine, and a gateway loads the usage spilled there by
        # another suite's gateway (one of another version crashed a worker here).
        self._own_data_dir = None
        if "data_dir" not in settings:
            self._own_data_dir = tempfile.mkdtemp(prefix="ollama-gw-test-data-")
            self.env["OLLAMA_GW_DATA_DIR"] = self._own_data_dir
        self.proc = None
        self.log_path = None

    def cli(self, *args, check=True):
        """Run an `ollama-gw` command against this gateway's configuration."""
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        leak_check.remember_secrets(re.findall(r"ogw_[A-Za-z0-9_-]{43}", result.stdout))
        if check and result.returncode != 0:
            raise AssertionError(f"ollama-gw {' '.join(args)} failed: {result.stderr}")
        return result

    def add_key(self, *options):
        """Create a key with `ollama-gw keys add --json`; return its JSON (with `key`).

        Names are unique among live keys and a module's tests share one gateway: a name
        given before in this run gets a number (`--name user` again makes `user 2`).
        """
        options = list(options)
        if "--name" in options:
            at = options.index("--name") + 1
            NAMES_GIVEN[options[at]] += 1
            if NAMES_GIVEN[options[at]] > 1:
                options[at] = f"{options[at]} {NAMES_GIVEN[options[at]]}"
        return json.loads(self.cli("keys", "add", "--json", *options).stdout)

    def start(self, log_path):
        """Start `ollama-gw serve` and wait until it answers /health; stop it if it never does."""
        self.log_path = log_path
        leak_check.remember_log(log_path)
        with open(log_path, "wb") as log:
            # A session of its own: if it must be killed, its workers go with it.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            if not wait_for(self._healthy, START_SECONDS, interval=0.1):
                raise AssertionError(f"gateway did not become healthy in {START_SECONDS} s:\n"
                                     f"{self.log()}")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or a worker still booting
            return False

    def log(self):
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Stop the gateway and its workers; kill them all if they do not stop in `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and sig != signal.SIGKILL:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_session(self.proc)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            if self._own_data_dir is not None:
                shutil.rmtree(self._own_data_dir, ignore_errors=True)
