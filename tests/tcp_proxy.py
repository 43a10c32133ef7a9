"""A TCP proxy on 127.0.0.1 that a test can cut and restore: a database going away and back.

PostgreSQL itself is shared by every test run on the machine, so its outage is played
here instead: `cut()` drops every connection through the proxy and refuses new ones
(as a restarting server does), `restore()` lets connections through again.
"""
import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.up = True
        self._pairs = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False

    def __enter__(self):
        threading.Thread(target=self._accept, name=f"tcp-proxy:{self.port}", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def cut(self):
        """Drop every open connection and refuse new ones."""
        self.up = False
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for sock in (s for pair in pairs for s in pair):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self):
        self.up = True

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.add((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def proxied_database(url):
    """(proxy, url): a TcpProxy in front of the PostgreSQL server `url` names, and the URL
    that reaches the same database through it."""
    host_port = url.rpartition("@")[2].partition("/")[0]
    host, _, port = host_port.partition(":")
    with TcpProxy(host, int(port or 5432)) as proxy:
        yield proxy, url.replace(host_port, f"127.0.0.1:{proxy.port}")
