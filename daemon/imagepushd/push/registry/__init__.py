"""The OCI distribution protocol: one client per registry, auth, retries, uploads, health."""
