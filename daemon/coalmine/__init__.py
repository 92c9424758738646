"""coalmine: automated canary analysis for Cloudflare Workers gradual deployments."""

__version__ = "0.1.0"
