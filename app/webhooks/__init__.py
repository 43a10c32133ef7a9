"""Events sent to receivers: the outbox rows, their delivery, the HTTP send, where it may go.

Owns outbox (webhooks and the deliveries queued for them), delivery (the dispatcher that
claims and sends them, with retries), transport (the signed HTTP POST to a checked
address) and target (which URLs and addresses are allowed).

May import: app.store and the base.
"""
