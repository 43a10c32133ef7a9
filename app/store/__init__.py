"""The database and what lives in it: connection, tables, batching, health, the audit log.

Owns db (connections and migrations), models (the tables), batching (grouping writes
into one statement), health, audit (who changed what, and from where: client_address),
ids (row ids as URLs and commands write them) and private_files (files only the gateway's
user may read).

May import: the base only (app.config, app.errors, app.limits, app.cooperative,
app.redact, app.metrics).
"""
