"""Registries recognised by their host name, for the habits a name predicts.

Only what a name tells for sure belongs here; everything a registry says in its answers is
learned from the answers. See docs/registries.md for the habits and their sources.
"""

from __future__ import annotations

import re

#: Amazon ECR private registries: ``<account>.dkr.ecr.<region>.amazonaws.com`` and its FIPS
#: (``dkr.ecr-fips``), China (``.amazonaws.com.cn``), dual-stack (``dkr-ecr.<region>.on.aws``),
#: European Sovereign Cloud and isolated-region forms, as the ECR credential helper matches them
#: (awslabs/amazon-ecr-credential-helper ``ecr-login/api/client.go``, ``ecrPattern``).
_ECR_PRIVATE = re.compile(
    r"\d{12}\.dkr[.-]ecr(?:-fips)?\.[a-z0-9][a-z0-9_-]*\."
    r"(?:amazonaws\.(?:com(?:\.cn)?|eu)|on\.(?:aws|amazonwebservices\.com\.cn)"
    r"|sc2s\.sgov\.gov|c2s\.ic\.gov|cloud\.adc-e\.uk|csp\.hci\.ic\.gov)"
)
#: Amazon ECR Public's one registry host.
ECR_PUBLIC = "public.ecr.aws"


def _name(host: str) -> str:
    """``host`` without a port, lower-cased (``name[:port]``; IPv6 literals stay as they are)."""
    if host.startswith("["):
        return host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def is_ecr(host: str) -> bool:
    """Whether ``host`` is an Amazon ECR registry (private in any partition, or ECR Public)."""
    name = _name(host)
    return name == ECR_PUBLIC or _ECR_PRIVATE.fullmatch(name) is not None


def is_google_artifact_registry(host: str) -> bool:
    """``<location>-docker.pkg.dev``, or Container Registry's ``gcr.io`` hosts it now serves."""
    name = _name(host)
    return name.endswith("-docker.pkg.dev") or name == "gcr.io" or name.endswith(".gcr.io")
