"""Webhook notifications to parties, delivered from a transactional outbox.

An event is written to the ``outbox`` table in the same transaction as the state change
it reports (so a rolled-back change never notifies anyone, and a committed one always
does), then a worker POSTs it, HMAC-signed, retrying with backoff. Delivery is
at-least-once; receivers de-duplicate by the event id.
"""
