"""The state store: rollout state, traffic intents, the notification outbox and the journal."""
