"""pytest plugin for test runs on build machines: timing-based Hypothesis checks off.

Loaded with ``-p hypothesis_buildd`` (with packaging/ on ``PYTHONPATH``) by debian/rules and
by the test that runs the unit tests inside a Debian 12 root. A loaded build machine makes
data generation slow (``HealthCheck.too_slow``) and single examples slow (``deadline``);
neither says anything about the code under test, so both are off there. Every other
health check and every example still runs.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("buildd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("buildd")
