import pytest


@pytest.fixture(scope="session")
def target_rows(tmp_path_factory):
    """The compile matrix of every kernel x target, compiled once per test run into a fresh Triton cache."""
    from moekit.kernels import targets

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        return targets.compile_matrix(jobs=2)
