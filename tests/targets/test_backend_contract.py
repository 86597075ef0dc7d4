"""The backend contract, checked for every registered backend: adding a backend (one module in targets/, a
profile YAML, a lock pin, a README row) puts it under this test without editing it.

For each backend: every precision it declares converts the demo, the artifact runs in the backend's own
runner on feeds in the source layout and matches the FP32 reference; a precision it does not declare is
refused with exit 2 before any work.
"""
import subprocess
import sys

import numpy as np
import pytest

from edgebuild.pipeline.spec import PRECISIONS
from edgebuild.targets.base import get_backend
from edgebuild.targets.profiles import catalogue, known_backends

pytestmark = pytest.mark.slow

CALIB, EVAL = 64, 150
FLOAT = ("fp32", "fp16")


def _profile_for(backend: str):
    """The catalogue profile of this backend that runs the most precisions (float I/O, so outputs compare)."""
    mine = [p for p in catalogue().values() if p.backend == backend and p.io_dtype == "float32"]
    assert mine, f"backend {backend} has no float-I/O profile in targets/profiles/"
    return max(mine, key=lambda p: len(p.precisions))


def _cases():
    for name in known_backends():
        for precision in get_backend(name).precisions:
            yield pytest.param(name, precision, id=f"{name}-{precision}")


def test_every_backend_declares_what_it_builds():
    for name in known_backends():
        declared = get_backend(name).precisions
        assert declared and set(declared) <= set(PRECISIONS), name
        for profile in catalogue().values():
            if profile.backend == name:  # a shipped profile never promises what its backend cannot build
                assert set(profile.precisions) <= set(declared), profile.name


@pytest.mark.parametrize("backend_name,precision", list(_cases()))
def test_each_declared_precision_converts_runs_and_matches_the_reference(
        backend_name, precision, model, digits_split, tmp_path):
    from edgebuild.targets.onnx import OrtRunner

    backend = get_backend(backend_name)
    profile = _profile_for(backend_name)
    if precision not in profile.precisions:
        profile = type(profile)(**{**profile.to_dict(), "precisions": backend.precisions,
                                   "budgets": profile.budgets})
    train, test = digits_split
    calib, evalset = train.subset(np.arange(CALIB)), test.subset(np.arange(EVAL))
    art = backend.convert(model, profile, precision, calib, tmp_path, None)
    assert art.path.is_file() and art.precision == precision
    with OrtRunner(model.onnx_path, 1) as ref, backend.runner(art, 1) as run:
        got = np.stack([run.run(f)[0].reshape(-1) for f in evalset.feeds()])
        want = np.stack([ref.run(f)[0].reshape(-1) for f in evalset.feeds()])
    agreement = (got.argmax(1) == want.argmax(1)).mean()
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == want.shape
    if precision in FLOAT:
        assert agreement == 1.0 and cosine.min() > 0.999, (agreement, cosine.min())
    else:
        assert agreement >= 0.95 and np.median(cosine) > 0.98, (agreement, np.median(cosine))


@pytest.mark.parametrize("backend_name", known_backends())
def test_an_undeclared_precision_is_exit_2_before_any_work(backend_name, tmp_path):
    """A profile promising a precision its backend does not build is refused; where the backend builds every
    precision there is, asking a profile for one it does not list is refused the same way."""
    declared = get_backend(backend_name).precisions
    missing = [p for p in PRECISIONS if p not in declared]
    precisions, ask = (["int8", missing[0]], missing[0]) if missing else (["int8"], "fp16")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"name: contract-{backend_name}\nbackend: {backend_name}\ndescription: contract test\n"
                       f"precisions: [{', '.join(precisions)}]\n")
    r = subprocess.run([sys.executable, "-m", "edgebuild.pipeline.cli", "--profile", str(profile),
                        "--target", f"contract-{backend_name}", "--precision", ask, "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert ask in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
