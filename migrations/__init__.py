"""Numbered schema migrations, applied in order by `ollama-gw db upgrade`.

Each script defines ``up(migrator, db)`` and ``down(migrator, db)`` and declares the
tables it creates as frozen inline models, so later model changes cannot rewrite history.
"""
