"""gunicorn's gevent worker and logger, adjusted so no key leaks and refused bodies are not read.

Named by app/serving/gunicorn_conf.py. The master imports this module too, so it imports no
part of the application that touches the database: only gunicorn and two small modules.
"""
from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventWorker

from app.cooperative import closing_connections
from app.redact import redact_exception, redact_handlers


def closing_when_asked(app):
    """The WSGI app, with gunicorn told to close the connections the app asked to close.

    gunicorn drops a `Connection: close` header from the app, sends `keep-alive`, and
    would then read and discard the body the app refused unread before the next request.
    Hanging up after such an answer broke keep-alive clients, which sent their next
    request on a connection they believed open. Marked before the headers go out,
    gunicorn writes `Connection: close` itself and closes the connection after the answer.
    """
    def wsgi(environ, start_response):
        def start(status, headers, exc_info=None):
            if environ.get("gunicorn.socket") in closing_connections:
                # gunicorn hands its Response's bound start_response to the app.
                response = getattr(start_response, "__self__", None)
                if hasattr(response, "force_close"):
                    response.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wsgi


class GatewayWorker(GeventWorker):
    flask_app = None  # the application itself, for the hooks in app/serving/gunicorn_conf.py

    def load_wsgi(self):
        super().load_wsgi()
        self.flask_app = self.wsgi
        self.wsgi = closing_when_asked(self.wsgi)

    def handle_request(self, listener_name, req, sock, addr):
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            closing_connections.discard(sock)

    def handle_error(self, req, client, addr, exc):
        """gunicorn's 400 page and log line quote the bad request line: mask keys in it."""
        super().handle_error(req, client, addr, redact_exception(exc))


class GatewayLogger(Logger):
    """gunicorn's logger, writing through the redacting formatter."""

    def setup(self, cfg):
        super().setup(cfg)
        redact_handlers(self.error_log)
        redact_handlers(self.access_log)
