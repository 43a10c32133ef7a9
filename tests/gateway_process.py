"""A real gateway for integration tests: `ollama-gw serve` (gunicorn + gevent) in a subprocess."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            **{f"OLLAMA_GW_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.env.pop("OLLAMA_GW_CONFIG", None)
        self.proc = None
        self.log_path = None

    def cli(self, *args, check=True):
        """Run an `ollama-gw` command against this gateway's configuration."""
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ollama-gw {' '.join(args)} failed: {result.stderr}")
        return result

    def add_key(self, *options):
        """Create a key with `ollama-gw keys add --json`; return its JSON (with `key`)."""
        return json.loads(self.cli("keys", "add", "--json", *options).stdout)

    def start(self, log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway did not become healthy:\n{self.log()}")

    def log(self):
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
