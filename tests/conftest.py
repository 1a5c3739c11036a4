"""Shared hypothesis settings: deterministic, bounded, fast enough for a 2-core CI machine."""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


def pytest_configure(config):
    """mmseg's registries resolve names in the 'mmseg' scope, as its tools set it up."""
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
