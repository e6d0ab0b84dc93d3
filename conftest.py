"""Three tiers: ``python -m pytest`` runs the fast one (every script end to end once, all of common.py's
mathematics); ``python -m pytest --all`` adds the tests marked ``slow`` (torchrun, bit-exact resume, the full
bad-input matrix, compiled steps, the fetched teachers), as CI does; the tests marked ``cuda`` need a GPU and are
skipped without one, saying so (``python -m pytest --all -m cuda`` runs them alone on a GPU machine)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", help="also run the slow tests (marked 'slow'), as CI does")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test, run only with --all")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (the paths no CPU test can reach); skipped without one")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
    if config.getoption("--all"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:  # deselected, not skipped: the summary line says how many, and how to run them
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--all"):
        terminalreporter.write_line("the slow tests were deselected; python -m pytest --all runs every test")
