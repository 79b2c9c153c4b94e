"""Deploy notifications: Slack, Microsoft Teams and signed webhooks, sent from the outbox.

messages.py   what a notification says (pure): Slack blocks, a Teams Adaptive
              Card, a JSON event signed with HMAC-SHA256
send.py       one HTTP POST (aiohttp): bounded, no redirects, errors without the URL
outbox.py     the Deliverer: one task per target, in order, retries and backoff,
              leases shared through the records; and the CLI's delivery at exit
"""
