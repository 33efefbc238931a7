"""pytest plugin (``-p seed_recorder``, with ``tests/`` on ``sys.path``): records, per test, every
seed passed to torch's, numpy's and Python's random generators during the test's set-up, call
and teardown, and writes them as JSON to ``$COLABX_SEED_LOG`` when the session ends. Two runs
draw the same inputs when their logs are equal (tests/test_seeds.py). For the whole suite:

    for i in 1 2; do PYTHONHASHSEED=random COLABX_SEED_LOG=/tmp/seeds$i.json \
        PYTHONPATH=tests:. python -m pytest -q -m "not slow" -p seed_recorder tests; done
    cmp /tmp/seeds1.json /tmp/seeds2.json
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

_log: dict[str, list[str]] = {}
_current: list[str] = ["<collection>"]


def _record(kind: str, seed) -> None:
    _log.setdefault(_current[0], []).append(f"{kind}:{seed!r}")


class _Generator(torch.Generator):
    def manual_seed(self, seed):
        _record("torch.Generator", int(seed))
        return super().manual_seed(seed)


def _wrap(owner, name: str, kind: str) -> None:
    inner = getattr(owner, name)

    def wrapped(seed=None, *args, **kwargs):
        _record(kind, seed)
        return inner(seed, *args, **kwargs)

    setattr(owner, name, wrapped)


def pytest_configure(config):
    torch.Generator = _Generator
    _wrap(torch, "manual_seed", "torch.manual_seed")
    _wrap(np.random, "default_rng", "np.default_rng")
    _wrap(np.random, "seed", "np.seed")
    _wrap(random, "seed", "random.seed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    yield
    _current[0] = "<between tests>"


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("COLABX_SEED_LOG")
    if path:
        with open(path, "w") as fh:
            json.dump(_log, fh, indent=0, sort_keys=True)
