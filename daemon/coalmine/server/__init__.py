"""What coalmine serves over HTTP: the admin API, its OpenAPI document, /metrics and health."""
