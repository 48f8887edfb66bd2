"""imagepushd: push images from containerd's store to OCI registries as they are tagged."""

__version__ = "0.1.0"
