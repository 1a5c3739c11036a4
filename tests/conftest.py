"""Shared hypothesis settings (deterministic, bounded, fast enough for a 2-core CI machine) and fixtures."""
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


def pytest_configure(config):
    """mmseg's registries resolve names in the 'mmseg' scope, as its tools set it up."""
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def _gemm_paths():
    from iseg_plugin.ops import gemm

    return gemm.runnable_gemm_paths()


@pytest.fixture(params=_gemm_paths())
def gemm_path(request):
    """Runs a test once per GEMM path this machine computes exactly, forced (``int_mm``, ``avx2``, ``int32``: see
    iseg_plugin.ops.gemm), so that a machine of either kind tests the paths it does not pick by itself."""
    from iseg_plugin.ops import gemm

    with gemm.forced(request.param):
        yield request.param
