"""gunicorn's gevent worker and logger, adjusted so no key leaks and refused bodies are not read.

Named by app/gunicorn_conf.py. The master imports this module too, so it imports no
part of the application that touches the database: only gunicorn and two small modules.
"""
from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventWorker

from app.cooperative import closing_connections
from app.redact import redact_exception, redact_handlers


class GatewayWorker(GeventWorker):
    def handle_request(self, listener_name, req, sock, addr):
        keep_alive = super().handle_request(listener_name, req, sock, addr)
        if sock in closing_connections:  # app.cooperative.close_after_response()
            closing_connections.discard(sock)
            raise StopIteration("the gateway closes this connection after its answer")
        return keep_alive

    def handle_error(self, req, client, addr, exc):
        """gunicorn's 400 page and log line quote the bad request line: mask keys in it."""
        super().handle_error(req, client, addr, redact_exception(exc))


class GatewayLogger(Logger):
    """gunicorn's logger, writing through the redacting formatter."""

    def setup(self, cfg):
        super().setup(cfg)
        redact_handlers(self.error_log)
        redact_handlers(self.access_log)
