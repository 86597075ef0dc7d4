"""The leaf modules' shared helpers (pipeline/toplevel/): one cosine, one ``package.module:attr`` importer."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edgebuild.errors import BadInputError
from edgebuild.refs import import_ref
from edgebuild.similarity import cosine, per_sample_cosine


def test_cosine_of_flat_vectors_and_of_zero_vectors():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert cosine(a, 2 * a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0  # no direction, equal: agree
    assert cosine(np.zeros(3), np.full(3, 1e-6)) == 0.0
    assert cosine(np.zeros(3), np.full(3, 1e-6), zero_atol=1e-5) == 1.0
    per = per_sample_cosine(np.stack([a[0], a[1]]), np.stack([a[0], -a[1]]))
    np.testing.assert_allclose(per, [1.0, -1.0])


def test_pipeline_metrics_and_the_leaf_share_one_cosine():
    from edgebuild.pipeline import metrics

    assert metrics.cosine is cosine and metrics.per_sample_cosine is per_sample_cosine


def test_import_ref_resolves_dotted_attributes_and_reports_bad_references(tmp_path, monkeypatch):
    (tmp_path / "refmod_h4.py").write_text("class A:\n    class B:\n        value = 7\n")
    (tmp_path / "refbroken_h4.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_ref("refmod_h4:A.B", "model").value == 7
        for ref, message in [("no_colon", "use package.module:attr"), ("os.path:join;rm", "use package.module:attr"),
                             ("refmod_h4:Missing", "cannot import evaluator refmod_h4:Missing"),
                             ("no_such_module_h4:x", "cannot import evaluator no_such_module_h4:x"),
                             ("refbroken_h4:x", "importing refbroken_h4 raised RuntimeError: boom")]:
            with pytest.raises(BadInputError, match=message.replace("(", r"\(")):
                import_ref(ref, "evaluator")
    finally:
        for name in ("refmod_h4", "refbroken_h4"):
            sys.modules.pop(name, None)
