"""The optional SGLang tier: tests that drive SGLang's own classes (``pytest -m sglang``).

Each module checks the installed SGLang release itself and skips, naming the
release it needs, when that one is not importable; the main suite (no SGLang)
therefore collects them as skips. Build the tier with ``ci/run_sglang_tier.sh``.
"""

from tests.conftest_mp import daemons, workdir  # noqa: F401  (fixtures: a real daemon, a short tmp dir)


def pytest_configure(config):
    config.addinivalue_line("markers", "sglang: drives SGLang's own classes (optional tier, ci/run_sglang_tier.sh)")
