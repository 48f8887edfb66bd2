"""Tests of the state file, one module per module of ``imagepushd.remember``."""
