"""ExecuTorch's C++ runtime from Python without torch: numpy arrays in and out through libedgebuild_et.so (a C ABI
over the executorch wheel's prebuilt ``extension::Module``, edgebuild_et.cpp). Installed in the aarch64 emulator
root by setup_arm64_emulator.sh, beside the aarch64 executorch wheel whose libraries it links; the device runner
uses it where the wheel's Python bindings cannot load (they link libtorch). The subset of the bindings' API the
runner calls: ``_load_for_executorch(path).forward(inputs)`` and ``_unsafe_reset_threadpool(n)``.
"""
import ctypes
import os

import numpy as np

_LIB = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libedgebuild_et.so"))
_LIB.et_load.restype = ctypes.c_void_p
_LIB.et_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_LIB.et_free.argtypes = [ctypes.c_void_p]
_LIB.et_set_input.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_size_t,
                              ctypes.c_char_p, ctypes.c_size_t]
_LIB.et_forward.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
_LIB.et_num_outputs.argtypes = [ctypes.c_void_p]
_LIB.et_output.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                           ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
                           ctypes.POINTER(ctypes.c_size_t)]
_LIB.et_set_threads.argtypes = [ctypes.c_uint32]

# ExecuTorch's ScalarType codes (runtime/core/portable_type/scalar_type.h) <-> numpy
_CODES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.int64): 4, np.dtype(np.float16): 5, np.dtype(np.float32): 6, np.dtype(np.float64): 7,
          np.dtype(np.bool_): 11}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _unsafe_reset_threadpool(threads):
    if _LIB.et_set_threads(int(threads)) != 0:
        raise RuntimeError("ExecuTorch: cannot set the thread pool to %d threads" % threads)


class Module:
    def __init__(self, path):
        err = ctypes.create_string_buffer(512)
        self._h = _LIB.et_load(os.fsencode(path), err, len(err))
        if not self._h:
            raise RuntimeError(err.value.decode(errors="replace"))

    def forward(self, inputs):
        err = ctypes.create_string_buffer(512)
        for k, x in enumerate(inputs):
            x = np.ascontiguousarray(x)
            if x.dtype not in _CODES:
                raise TypeError("input %d: dtype %s has no ExecuTorch counterpart here" % (k, x.dtype))
            sizes = (ctypes.c_int64 * max(x.ndim, 1))(*x.shape)
            if _LIB.et_set_input(self._h, k, _CODES[x.dtype], x.ndim, sizes, x.ctypes.data, x.nbytes, err, len(err)):
                raise RuntimeError(err.value.decode(errors="replace"))
        if _LIB.et_forward(self._h, err, len(err)):
            raise RuntimeError(err.value.decode(errors="replace"))
        outputs = []
        for j in range(_LIB.et_num_outputs(self._h)):
            dtype, ndim, sizes = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 16)()
            data, nbytes = ctypes.c_void_p(), ctypes.c_size_t()
            if _LIB.et_output(self._h, j, ctypes.byref(dtype), ctypes.byref(ndim), sizes, ctypes.byref(data),
                              ctypes.byref(nbytes)):
                raise TypeError("output %d is not a tensor" % j)
            if dtype.value not in _DTYPES:
                raise TypeError("output %d: ExecuTorch dtype code %d is not read here" % (j, dtype.value))
            raw = ctypes.string_at(data, nbytes.value) if nbytes.value else b""
            outputs.append(np.frombuffer(raw, dtype=_DTYPES[dtype.value]).reshape(tuple(sizes[:ndim.value])).copy())
        return outputs

    def __del__(self):
        if getattr(self, "_h", None):
            _LIB.et_free(self._h)
            self._h = None


def _load_for_executorch(path):
    return Module(path)
