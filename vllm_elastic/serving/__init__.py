"""Deployments of vLLM engines with the elastic plugin (Ray Serve)."""
