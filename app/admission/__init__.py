"""Whether a request may run now: rate limits and quotas, the fair queue, model policy.

Owns ratelimit (rate limits and concurrency slots per key), quota (token quotas, each
request's tokens reserved before it runs), estimate (a request's prompt tokens, guessed
offline), fair_queue (an upstream's slots shared fairly between keys), holders (rows left
by workers that died) and model_policy (per-key caps on models and options).

May import: app.keys, app.webhooks, app.store and the base. Not app.proxy or anything
above it; app.upstreams and app.accounting sit beside it.
"""
