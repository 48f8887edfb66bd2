"""Registries recognised by host name."""

from __future__ import annotations

import pytest

from imagepushd.push.registry.hosts import is_ecr, is_google_artifact_registry


@pytest.mark.parametrize(
    "host",
    [
        "123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
        "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
        "123456789012.dkr-ecr.eu-central-1.on.aws",
        "123456789012.dkr-ecr-fips.us-east-1.on.aws",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com:443",
        "123456789012.DKR.ECR.us-east-1.AmazonAWS.com",
        "public.ecr.aws",
    ],
)
def test_ecr_hosts(host: str) -> None:
    assert is_ecr(host)


@pytest.mark.parametrize(
    "host",
    [
        "12345.dkr.ecr.us-east-1.amazonaws.com",  # an account id has 12 digits
        "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example",
        "evil.example/123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "ecr.aws",
        "registry.example.com",
        "[::1]:5000",
    ],
)
def test_not_ecr_hosts(host: str) -> None:
    assert not is_ecr(host)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("europe-west1-docker.pkg.dev", True),
        ("gcr.io", True),
        ("eu.gcr.io", True),
        ("docker.pkg.dev.example.com", False),
        ("ghcr.io", False),
    ],
)
def test_google_artifact_registry_hosts(host: str, expected: bool) -> None:
    assert is_google_artifact_registry(host) is expected
