"""Running the gateway under gunicorn: its settings (gunicorn_conf), worker and logger, start-up.

gunicorn's master imports gunicorn_conf and worker before it forks: they, and this file,
must not pull in the database layer or requests/ssl (gevent patches each worker after
fork). They import app.store, app.admission or app.accounting only inside the hooks
that run in a worker; tests/test_project.py checks.

May import: everything below it, create_app included (server); nothing imports it but
cli and the app/gunicorn_conf.py shim.
"""
