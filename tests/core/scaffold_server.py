"""A small TrainerService built on the shared scaffolding, run as its own process by test_server.py.

It exercises what every real service gets from rlhf.core.server: a load phase (held open until a gate file
appears, so the test can see NOT_SERVING), a slow call (SaveCheckpoint sleeps), and validation errors.
"""

import argparse
import asyncio
from pathlib import Path

from pydantic import Field

from rlhf.core.config import ServerConfig, add_config_arguments, config_from_args
from rlhf.core.errors import require
from rlhf.core.server import ServiceDef, serve_forever
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc


class ScaffoldConfig(ServerConfig):
    gate_file: str | None = Field(None, description="Loading completes once this file exists.")
    slow_seconds: float = Field(2.0, description="How long SaveCheckpoint takes.")


class Servicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, config: ScaffoldConfig):
        self.config = config

    async def GetStatus(self, request, context):
        return trainer_pb2.GetStatusResponse(status=trainer_pb2.JobStatus(job_id="scaffold", step=7))

    async def SaveCheckpoint(self, request, context):
        await asyncio.sleep(self.config.slow_seconds)
        return trainer_pb2.SaveCheckpointResponse(checkpoint=trainer_pb2.Checkpoint(path="/tmp/ckpt", step=7))

    async def Stop(self, request, context):
        require(len(request.reason) <= 16, "reason", f"{len(request.reason)} chars > limit 16")
        return trainer_pb2.StopResponse(status=trainer_pb2.JobStatus(state=trainer_pb2.JOB_STATE_STOPPING))

    async def StreamProgress(self, request, context):
        for step in range(3):
            yield trainer_pb2.StreamProgressResponse(status=trainer_pb2.JobStatus(step=step))


def main() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ScaffoldConfig)
    config = config_from_args(ScaffoldConfig, parser.parse_args())

    async def load(handle):
        while config.gate_file and not Path(config.gate_file).exists():
            await asyncio.sleep(0.05)

    service = ServiceDef(
        "rlhf.v1.TrainerService", Servicer(config), trainer_pb2_grpc.add_TrainerServiceServicer_to_server
    )
    serve_forever(config, [service], load=load)


if __name__ == "__main__":
    main()
