"""Fixtures shared by the backend tests: the demo as a backend's ExportedModel, and small data sets."""
import numpy as np
import pytest

from edgebuild.pipeline.stages.export import file_hash
from edgebuild.targets.base import ExportedModel, TensorInfo


@pytest.fixture(scope="module")
def model(demo_onnx, demo_program):
    return ExportedModel(demo_onnx, (TensorInfo("input", (1, 1, 8, 8), "float32", "NCHW"),),
                      (TensorInfo("logits", (1, 10), "float32"),), 17, file_hash(demo_onnx), program=demo_program)


@pytest.fixture(scope="session")
def demo_program(tmp_path_factory):
    """The demo as a torch.export program (.pt2), for backends that consume one (``Backend.consumes``)."""
    import torch

    from edgebuild.pipeline.demo_model import load_demo

    path = tmp_path_factory.mktemp("demo-program") / "demo.pt2"
    torch.export.save(torch.export.export(load_demo(), (torch.zeros(1, 1, 8, 8),)), str(path))
    return path


@pytest.fixture(scope="module")
def small_sets(digits_split):
    """(100 calibration samples, 300 labelled evaluation samples)."""
    train, test = digits_split
    return train.subset(np.arange(100)), test.subset(np.arange(300))
