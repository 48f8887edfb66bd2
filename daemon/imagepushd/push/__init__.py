"""Push: an image from a blob store to a registry (the use case, the pusher, registry clients)."""
