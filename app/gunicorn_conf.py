"""Keeps the documented `gunicorn -c python:app.gunicorn_conf wsgi:app` working.

The settings and hooks live in app/serving/gunicorn_conf.py; gunicorn reads this module's
names, which are theirs.
"""
from app.serving.gunicorn_conf import *  # noqa: F403
