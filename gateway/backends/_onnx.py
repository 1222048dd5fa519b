"""One ONNX Runtime session, as both backends run it (in the gateway, or in a Ray replica).

Kept free of Ray and asyncio so a Ray replica can import it cheaply.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

from gateway.errors import BackendError, InvalidInput

__all__ = ["OnnxSession", "select_providers"]

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_BF16 = np.dtype(ml_dtypes.bfloat16)
_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16


def select_providers(device: str, available: list[str] | None = None) -> list[str]:
    """Execution providers for ``device``; ``cuda`` without CUDA is a load-time error."""
    available = ort.get_available_providers() if available is None else available
    if device == "cuda":
        if _CUDA not in available:
            raise BackendError(
                "device: cuda was requested but ONNX Runtime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu with CUDA, "
                "or set device: cpu or auto"
            )
        return [_CUDA, _CPU]
    if device == "auto" and _CUDA in available:
        return [_CUDA, _CPU]
    return [_CPU]


class OnnxSession:
    """An ONNX Runtime session that takes and returns numpy arrays keyed by tensor name."""

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
        self.providers = select_providers(device)
        self._session = ort.InferenceSession(path, options, providers=self.providers)
        self.device = "cuda" if self._session.get_providers()[0] == _CUDA else "cpu"
        self._string_inputs = {
            i.name for i in self._session.get_inputs() if i.type == "tensor(string)"
        }
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._has_bf16_output = any(
            o.type == "tensor(bfloat16)" for o in self._session.get_outputs()
        )

    def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        feed: dict[str, Any] = {}
        for name, value in inputs.items():
            if name in self._string_inputs:
                feed[name] = _to_str_array(name, value)
            elif value.dtype == _BF16:
                # ONNX Runtime has no numpy bfloat16 dtype: hand it the bits with the type.
                feed[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(value).view(np.uint16), _ONNX_BFLOAT16
                )
            else:
                feed[name] = value
        try:
            if self._has_bf16_output:
                results = [_ortvalue_to_numpy(v) for v in self._run_ortvalues(feed)]
            else:
                results = self._session.run(self._output_names, feed)
        except Exception as exc:  # ORT raises its own types; the message is what matters
            raise BackendError(f"ONNX Runtime failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def _run_ortvalues(self, feed: dict[str, Any]) -> list[Any]:
        values = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
            for k, v in feed.items()
        }
        return list(self._session.run_with_ort_values(self._output_names, values))


def _ortvalue_to_numpy(value: Any) -> np.ndarray[Any, Any]:
    """ONNX Runtime cannot hand bfloat16 to numpy: copy the bits out of the CPU buffer."""
    if value.data_type() != "tensor(bfloat16)":
        result: np.ndarray[Any, Any] = value.numpy()
        return result
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    buffer = memoryview((ctypes.c_uint16 * count).from_address(value.data_ptr())).cast("B")
    bits = np.frombuffer(buffer, dtype=np.uint16).copy()
    result_bf16: np.ndarray[Any, Any] = bits.view(_BF16).reshape(shape)
    return result_bf16


def _to_str_array(name: str, value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(value.shape, dtype=np.object_)
    try:
        out.ravel()[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in value.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': BYTES element is not valid UTF-8") from None
    return out
