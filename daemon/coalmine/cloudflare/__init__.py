"""Cloudflare: the REST and GraphQL client, the actuator that changes traffic, and the budgets
(token buckets) every call spends."""
