"""API keys: creating, rotating, revoking and looking them up (registry), and the demo keys.

May import: app.webhooks (key events are webhook events), app.store and the base.
"""
