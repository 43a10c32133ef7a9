"""What requests used: usage records and their roll-ups, the per-request record, statistics.

Owns usage (records, batches, quotas' counters, pruning), request_record (what every
request leaves behind: usage row, metrics, access log), stats and histogram (what the
statistics endpoints and the dashboard read) and dead_letters (records the database
would not take, kept on disk).

May import: app.keys, app.webhooks, app.store and the base. Not app.proxy or anything
above it.
"""
