"""gunicorn running the gateway: what `ollama-gw serve` executes, in a fresh interpreter.

The master must not import the database layer: gevent patches `threading.local` in each
worker after fork, and peewee, if imported earlier, keeps the unpatched class, so all
greenlets of a worker would share one connection. Here the master imports gunicorn and
the settings only; workers build the app after gevent has patched them.
"""
import contextlib
import resource

from gunicorn.app.base import BaseApplication


class GatewayServer(BaseApplication):
    """gunicorn with the settings of app.serving.gunicorn_conf and create_app() as the WSGI app.

    Not `gunicorn app:create_app()`: gunicorn puts the working directory first on
    sys.path, so a directory with its own `app` package would be served instead.
    """

    def load_config(self):
        from app.serving import gunicorn_conf

        for name, value in vars(gunicorn_conf).items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self):
        from app import create_app

        return create_app()


def raise_open_file_limit():
    """Let each worker use every file descriptor it is allowed (a stream holds two).

    A shell's soft limit is often 1,024: about 500 streams. The hard limit is what the
    administrator allows (the systemd unit sets 65,536); workers inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit, say
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    raise_open_file_limit()
    GatewayServer().run()
