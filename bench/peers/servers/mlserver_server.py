"""MLServer with a custom runtime (an ``MLModel`` calling ONNX Runtime) and its adaptive
batching, OIP v2 over HTTP and gRPC.

MLServer's own settings otherwise, except that it logs no line per request (``debug``) and
serves no metrics port; its scratch folders (metrics, environments) go to a temporary
directory instead of the working directory.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile

from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers.servers._common import Model, parse_args


class ONNXModel(MLModel):
    """The MLP in ONNX Runtime; MLServer hands it whole batches."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        assert parameters is not None and parameters.uri is not None
        extra = parameters.extra or {}
        self._model = Model(parameters.uri, extra["input_name"])
        self._output_name = str(extra["output_name"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        batch = NumpyCodec.decode_input(payload.inputs[0])
        output = NumpyCodec.encode_output(self._output_name, self._model(batch))
        return InferenceResponse(model_name=self.name, outputs=[output])


async def serve(scratch: str) -> None:
    args = parse_args(__doc__)
    settings = Settings(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        debug=False,
        metrics_endpoint=None,
        metrics_dir=f"{scratch}/metrics",
        environments_dir=f"{scratch}/envs",
    )
    model = ModelSettings(
        name=args.name,
        # By import path: MLServer imports the runtime itself, also in its worker processes.
        implementation=f"{__spec__.name if __spec__ else __name__}.ONNXModel",
        max_batch_size=args.max_batch_size,
        max_batch_time=args.max_delay_us / 1e6,
        parameters=ModelParameters(
            uri=args.model,
            extra={"input_name": args.input_name, "output_name": args.output_name},
        ),
    )
    # Built inside the running loop: MLServer installs its signal handlers on it.
    server = MLServer(settings)
    await server.start([model])


def main() -> None:
    scratch = tempfile.mkdtemp(prefix="mlserver-")
    try:
        asyncio.run(serve(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
