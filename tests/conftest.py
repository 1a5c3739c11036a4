"""Shared hypothesis settings (deterministic, bounded, fast enough for a 2-core CI machine) and fixtures."""
import pytest
from hypothesis import HealthCheck, settings

from iseg_plugin.ops import gemm

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


def pytest_configure(config):
    """mmseg's registries resolve names in the 'mmseg' scope, as its tools set it up."""
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)


@pytest.fixture(params=gemm.GEMM_PATHS)
def gemm_path(request):
    """Runs a test once per GEMM path (iseg_plugin.ops.gemm.GEMM_PATHS), forced, so that a machine of either kind
    tests the paths it does not pick by itself; skipped, naming the flag, where the CPU lacks the instructions."""
    if request.param not in gemm.runnable_gemm_paths():
        pytest.skip(f"the CPU lacks {gemm.NEEDS[request.param]} (or the kernels did not build): "
                    f"GEMM path {request.param} cannot run here")
    with gemm.forced(request.param):
        yield request.param
