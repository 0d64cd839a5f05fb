"""Shared pytest fixtures: generic only (every test file may rely on them); and which tests
are ``slow``."""

import pytest
import torch

# TRITON_INTERPRET (Triton's interpreter without a GPU) is set by the repository's root
# conftest.py, which pytest loads first.

# The slowest tests (``python -m pytest --durations=30``), marked ``slow``: they run only when
# asked for (``python -m pytest -m slow``, see ON_REQUEST), and ``.ci/run`` runs them.
# file -> test functions (None: the whole file). Measured on the 2-core machine, loaded:
SLOW_TESTS: dict[str, set[str] | None] = {
    "test_bench.py": {"test_bench_command_writes_json_and_a_table"},  # the bench command: ~1 min
    "test_functional.py": {  # torch.compile's first compilation: ~20 s
        "test_compiled_layer_in_training_updates_its_buffers_like_eager",
        "test_compiled_layer_in_inference_matches_eager_and_keeps_its_buffers",
        "test_compiled_functional_batch_norm_matches_eager",
        "test_compiled_layer_with_dynamic_shapes_rejects_a_one_sample_batch_like_eager",
        "test_compiled_layer_normalizing_with_its_buffers_has_eager_gradients",
    },
    "test_kernels.py": {
        "test_compile_and_torch_func_fall_back_from_the_fast_path",
        # compiles the parallel flavor of every loop variant it runs: ~1 min from no cache
        "test_parallel_loops_give_the_serial_loops_results",
    },
    "test_activation.py": {"test_compiled_layer_with_activation_matches_eager"},  # ~25 s
    "test_typing.py": {  # mypy --strict, analyzing torch: 30 s to 3 min (seconds once cached)
        "test_a_user_script_passes_mypy_strict",
        "test_a_type_error_in_a_user_script_is_reported",
        "test_the_layer_s_options_and_aliases_have_their_types_for_type_checkers",
    },
}
# Tests that use these fixtures start processes (torch.distributed over gloo): ~1 min; or
# train every network of the demo (test_demo.py's quick_run): minutes.
SLOW_FIXTURES = {"spawned", "quick_run"}


def is_slow(item: pytest.Item) -> bool:
    """Whether ``item`` is one of :data:`SLOW_TESTS` or uses one of :data:`SLOW_FIXTURES`."""
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if item.path.name not in SLOW_TESTS:
        return False
    names = SLOW_TESTS[item.path.name]
    return names is None or getattr(item, "originalname", item.name) in names


# Marker -> why its tests run only when asked for by name or marker: the default run
# (`python -m pytest`) is the quick one; .ci/run also runs `-m slow`, `-m triton` and `-m zoo`.
# A test with several of these markers runs when any of them is asked for.
ON_REQUEST = {
    "slow": "slow test (processes, torch.compile, mypy, the demo, ...): run it with -m slow",
    "triton": "Triton kernel test: run it with -m triton",  # Triton's interpreter is slow
    "zoo": "model-zoo test: run it with -m zoo (needs the zoo extra)",  # ~4 min on 2 cores
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selection = (config.getoption("markexpr") or "") + (config.getoption("keyword") or "")
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
        markers = [marker for marker in ON_REQUEST if marker in item.keywords]
        if markers and not any(marker in selection for marker in markers):
            item.add_marker(pytest.mark.skip(reason=ON_REQUEST[markers[0]]))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global RNG before every test, so that random inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: on a busy 2-core machine torch's own
    threads only contend with each other (measured: 30 s against 3.5 s for three tool test
    files). Use it per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
