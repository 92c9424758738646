"""Notifications: decisions turned into PagerDuty, Slack and Grafana events, delivered through a
durable outbox."""
