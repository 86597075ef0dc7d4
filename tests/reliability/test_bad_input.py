"""Bad input is exit 2 with one line and nothing written: a table of cases that fail before conversion."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.conftest import listing

HERE = Path(__file__).parent
T = ("--target", "onnx-cpu", "--no-cache", "--no-auto")


def _profile(text: str):
    def setup(d: Path):
        (d / "board.yaml").write_text(text)
        return ["--profile", "board.yaml", "--target", "board"]
    return setup


def _file(name: str, data: bytes | str):
    def setup(d: Path):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return []
    return setup


def _model_module(d: Path):
    shutil.copy(HERE / "broken_syntax.txt", d / "broken_syntax_mod.py")
    return []


def _weights(d: Path):
    import torch

    torch.save({"fc.weight": torch.zeros(5, 4), "extra": torch.zeros(1)}, d / "w.pt")
    return []


def _npz(d: Path):
    np.savez(d / "data.npz", x=np.zeros((8, 1, 8, 8), np.float32))
    return []


def _onnx(d: Path):
    import torch

    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(d / "m.onnx"), dynamo=False, opset_version=17)
    return []


def _text_behind_npz_link(d: Path):
    (d / "notes.txt").write_text("just some notes\n")
    (d / "link.npz").symlink_to(d / "notes.txt")
    return []


def _npz_claiming_32_tib(d: Path):
    """A one-member .npz whose .npy header claims a (2**21, 2**21) float64 array (32 TiB) over 16 bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (2 ** 21, 2 ** 21)})
    with zipfile.ZipFile(d / "huge.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 16)
    return []


def _npz_with_a_pickle(d: Path):
    np.savez(d / "objects.npz", x=np.array([{"a": 1}, None], dtype=object))
    return []


def _npz_with_nan(d: Path):
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(d / "nan.npz", x=x, y=np.zeros(16, int))
    return []


PROFILE = "name: board\nbackend: onnx\ndescription: a board\n"

# id: (setup(dir) -> extra args, args, exit code, message regex)
CASES = {
    # budgets (issue 9 item 8)
    "accuracy budget nan": (None, ["--max-accuracy-drop", "nan", *T], 2, "max_accuracy_drop must be a finite"),
    "compression budget nan": (None, ["--max-compression-drop", "nan", *T], 2, "max_compression_drop must be a finite"),
    "accuracy budget inf": (None, ["--max-accuracy-drop", "inf", *T], 2, "finite"),
    "negative latency budget": (None, ["--max-latency-ms", "-1", *T], 2, "max_latency_ms must be positive"),
    "negative size budget": (None, ["--max-size-mb", "-0.5", *T], 2, "max_size_mb must be positive"),
    "zero latency budget": (None, ["--max-latency-ms", "0", *T], 2, "must be positive"),
    "negative accuracy budget": (None, ["--max-accuracy-drop", "-1", *T], 2, ">= 0"),
    "budget not a number in yaml": (_file("edgebuild.yaml", "budgets: {max_size_mb: big}\n"), T, 2, "must be a number"),
    "budget nan in yaml": (_file("edgebuild.yaml", "budgets: {max_accuracy_drop: .nan}\n"), T, 2, "finite"),
    # profiles are validated when loaded
    "profile threads: many": (_profile(PROFILE + "threads: many\n"), [], 2, "threads must be a positive integer"),
    "profile threads: 0": (_profile(PROFILE + "threads: 0\n"), [], 2, "threads must be a positive integer"),
    "profile backend: base": (_profile(PROFILE.replace("onnx", "base")), [], 2, "unknown backend 'base'"),
    "profile backend: isolated": (_profile(PROFILE.replace("onnx", "isolated")), [], 2, "unknown backend"),
    "profile backend path": (_profile(PROFILE.replace("onnx", "../x")), [], 2, "unknown backend"),
    "profile budget nan": (_profile(PROFILE + "budgets: {max_accuracy_drop: .nan}\n"), [], 2, "finite"),
    "profile negative latency": (_profile(PROFILE + "budgets: {max_latency_ms: -3}\n"), [], 2, "positive"),
    "profile min_cosine 2": (_profile(PROFILE + "budgets: {min_cosine: 2}\n"), [], 2, "between -1 and 1"),
    "profile budgets a list": (_profile(PROFILE + "budgets: [1, 2]\n"), [], 2, "budgets must be a mapping"),
    "profile quant a list": (_profile(PROFILE + "quant: [a]\n"), [], 2, "quant must be a mapping"),
    "profile unknown key": (_profile(PROFILE + "colour: red\n"), [], 2, "unknown profile key"),
    "profile python tag": (_profile(PROFILE + "x: !!python/object/apply:os.system ['true']\n"), [], 2, "not valid YAML"),
    "profile name traversal": (_profile(PROFILE.replace("name: board", "name: ../../etc")), [], 2, "profile name"),
    "profile not a mapping": (_profile("- a\n- b\n"), [], 2, "must be a mapping"),
    "profile file missing": (None, ["--profile", "nope.yaml", *T], 2, "profile file not found"),
    "unknown target": (None, ["--target", "toaster"], 2, "unknown target"),
    # model sources
    "module raises on import": (None, ["--model", "tests.reliability.broken_import:net", "--input-shape", "1,4", *T], 2,
                                "importing tests.reliability.broken_import raised ValueError"),
    "module has a SyntaxError": (_model_module, ["--model", "broken_syntax_mod:net", "--input-shape", "1,4", *T], 2,
                                 "SyntaxError in broken_syntax_mod.py line 1"),
    "factory raises": (None, ["--model", "tests.reliability.models:raising_factory", "--input-shape", "1,4", *T], 2,
                       r"raising_factory\(\) raised RuntimeError: factory exploded"),
    "factory returns no module": (None, ["--model", "tests.reliability.models:not_a_module", "--input-shape", "1,4", *T],
                                  2, "not an nn.Module"),
    "module not found": (None, ["--model", "no_such_pkg.mod:net", "--input-shape", "1,4", *T], 2, "cannot import model"),
    "bad module reference": (None, ["--model", "os.path:join;rm", *T], 2, "use package.module:attr|cannot import"),
    "state dict mismatch keeps details": (_weights, ["--model", "tests.reliability.models:tiny", "--weights", "w.pt",
                                                     "--input-shape", "1,4", *T], 2,
                                          r"Missing key\(s\).*fc\.bias.*Unexpected key\(s\).*extra.*size mismatch"),
    "weights missing": (None, ["--model", "tests.reliability.models:tiny", "--weights", "none.pt", "--input-shape", "1,4",
                               *T], 2, "weights not found"),
    "weights with an ONNX model": (_onnx, ["--model", "m.onnx", "--weights", "w.pt", *T], 2, "--weights is for package"),
    "weights with the demo": (None, ["--weights", "w.pt", *T], 2, "--weights needs --model"),
    "input shape with the demo": (None, ["--input-shape", "1,3,224,224", *T], 2, "the built-in demo's input is 1,1,8,8"),
    "torch module without shape": (None, ["--model", "tests.reliability.models:tiny", *T], 2, "need the input shape"),
    "corrupt onnx": (_file("m.onnx", b"\x00garbage"), ["--model", "m.onnx", *T], 2, "not a valid ONNX model"),
    "corrupt pt2": (_file("m.pt2", b"PK\x03\x04garbage"), ["--model", "m.pt2", *T], 2, "refusing to load|not a torch"),
    "corrupt torchscript": (_file("m.pt", b"garbage"), ["--model", "m.pt", "--input-shape", "1,4", *T], 2,
                            "not a TorchScript file"),
    "model file missing": (None, ["--model", "missing.onnx", *T], 2, "model not found"),
    "unknown model format": (_file("m.h5", b"x"), ["--model", "m.h5", *T], 2, "unknown model format"),
    # flags and config
    "compress unbalanced list": (None, ["--compress", "prune:ratio=[1,2", *T], 2, "cannot read the value of ratio"),
    "compress without =": (None, ["--compress", "prune:ratio", *T], 2, "options must be key=value"),
    "config missing": (None, ["-c", "nope.yaml", *T], 2, "config file not found"),
    "config not yaml": (_file("edgebuild.yaml", "a: [1,\n"), T, 2, "not valid YAML"),
    "config python tag": (_file("edgebuild.yaml", "model: !!python/object/apply:os.system ['true']\n"), T, 2,
                          "not valid YAML"),
    "config unknown key": (_file("edgebuild.yaml", "colour: red\n"), T, 2, "unknown build option"),
    "config top level a list": (_file("edgebuild.yaml", "- 1\n"), T, 2, "must be a mapping"),
    "precision not run by target": (None, ["--precision", "fp16", "--target", "cortex-m"], 2, "does not run fp16"),
    # issue 27: one line, exit 2, never a traceback, never numpy's allow_pickle advice
    "budgets a word": (_file("edgebuild.yaml", "budgets: fast\n"), T, 2, "budgets must be a mapping"),
    "cosine_min 2": (_file("edgebuild.yaml", "budgets: {cosine_min: 2}\n"), T, 2,
                     r"budgets\.cosine_min must be between -1 and 1"),
    "agreement_min 120": (_file("edgebuild.yaml", "budgets: {top1_agreement_min: 120}\n"), T, 2, "between 0 and 100"),
    "empty pt2": (_file("empty.pt2", b""), ["--model", "empty.pt2", *T], 2,
                  r"not a torch\.export program \(empty file\)$"),
    "calib link to a text file": (_text_behind_npz_link, ["--calib", "link.npz", *T], 2,
                                  r"link\.npz: not a \.npz archive \(not a zip"),
    "calib npz claiming 32 TiB": (_npz_claiming_32_tib, ["--calib", "huge.npz", *T], 2,
                                  r"member x claims \[2097152, 2097152\] float64 \(32\.0 TiB\) but holds"),
    "calib npz member a pickle": (_npz_with_a_pickle, ["--calib", "objects.npz", *T], 2,
                                  r"member x holds Python objects \(a pickle\)"),
    "calib with NaN": (_npz_with_nan, ["--calib", "nan.npz", *T], 2, r"nan\.npz: input input has 1 NaN/Inf value"),
    "device url malformed IPv6": (None, ["validate", ".", "--device", "ssh://[::1"], 2, "expected ssh://"),
    "calib_samples zero": (_file("edgebuild.yaml", "calib_samples: 0\n"), T, 2, "calib_samples must be positive"),
    "unknown flag": (None, ["--frobnicate"], 2, "No such option"),
    "validate: no metadata": (None, ["validate", ".", "--eval", "digits"], 2, "no metadata.json"),
    "validate: broken metadata": (_file("metadata.json", "{oops"), ["validate", ".", "--eval", "digits"], 2,
                                  "not an edgebuild metadata.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, workdir, edgebuild):
    setup, args, code, message = CASES[case]
    extra = setup(workdir) if setup else []
    before = listing(workdir)
    r = edgebuild(*args, *extra)
    if case == "unknown flag":  # click's own usage error: "Error: No such option"
        assert r.code == 2 and "Traceback" not in r.err and "No such option" in r.err
    else:
        r.check(code, message)
    assert listing(workdir) == before  # no output, no staging or temp directory left
