"""Deployment: job submission, KubeRay manifests."""
