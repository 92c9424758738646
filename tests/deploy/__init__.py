"""Tests of the deployment artifacts: the Dockerfile, the systemd unit, the Kubernetes manifests."""
