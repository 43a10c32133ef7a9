"""The Ollama servers: talking to one (client) and choosing among them (pool).

May import: app.keys, app.webhooks, app.store and the base. Not app.proxy or anything
above it: a request's relay to the client lives in app.proxy.
"""
