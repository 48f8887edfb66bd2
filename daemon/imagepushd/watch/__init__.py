"""Watch: containerd's metadata and content store, read without locks, and the watcher."""
