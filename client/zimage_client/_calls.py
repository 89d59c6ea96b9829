"""The tritonclient calls of the sync and asyncio clients, worded once.

tritonclient's four clients (gRPC and HTTP, sync and aio) take the same calls but
differ in two ways: gRPC takes its deadline per call (``client_timeout``) where
HTTP has it on the client, and gRPC's metadata calls need ``as_json`` and wrap the
model config in ``{"config": ...}``. Both our clients build their requests here, so
they send the same tensors with the same arguments and only differ in awaiting.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ._tensors import (LISTING_OUTPUT, GenerateRequest, listing_arrays, to_infer_inputs,
                       to_requested_outputs)
from ._transport import Transport

__all__ = ["Calls"]


class Calls:
    """Keyword arguments for each tritonclient call to one model on one transport."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def deadline(self, timeout_s: Optional[float]) -> Dict[str, Any]:
        return {"client_timeout": timeout_s} if self._transport.is_grpc else {}

    def infer(self, request: GenerateRequest, module: Any) -> Dict[str, Any]:
        """For ``client.infer(**...)``; ``module`` is the tritonclient module of that client."""
        t = self._transport
        return {
            "model_name": t.model_name,
            "inputs": to_infer_inputs(request.input_arrays(), module),
            "model_version": t.model_version,
            "outputs": to_requested_outputs(request.output_names(), module),
            **self.deadline(t.inference_timeout_s),
        }

    def listing(self, module: Any) -> Dict[str, Any]:
        """For ``client.infer(**...)`` asking only for the server's adapter registry."""
        t = self._transport
        return {
            "model_name": t.model_name,
            "inputs": to_infer_inputs(listing_arrays(), module),
            "model_version": t.model_version,
            "outputs": to_requested_outputs((LISTING_OUTPUT,), module),
            **self.deadline(t.inference_timeout_s),
        }

    def metadata(self) -> Dict[str, Any]:
        """For ``get_server_metadata`` and, with the model's name and version, ``get_model_config``."""
        as_json = {"as_json": True} if self._transport.is_grpc else {}
        return {**as_json, **self.deadline(self._transport.inference_timeout_s)}

    def model_config(self, answer: Dict[str, Any]) -> Dict[str, Any]:
        """The model config in one shape for both protocols."""
        return answer.get("config", answer) if self._transport.is_grpc else answer
