"""The TrainerService a running job serves (GetStatus, StreamProgress, SaveCheckpoint, Stop): a thin adapter
over the running job (:class:`ControlledJob`, which :class:`rlhf.trainer.job.TrainJob` is), run in a background thread of the training process (rank 0 only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.core.server import ServerHandle, ServerThread, ServiceDef
from rlhf.trainer.config import TrainJobConfig
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE_NAME = "rlhf.v1.TrainerService"
#: Job kinds (the names of run folders and metric labels) and their JobKind in the status messages.
KINDS = {
    "sft": trainer_pb2.JOB_KIND_SFT,
    "reward_model": trainer_pb2.JOB_KIND_REWARD_MODEL,
    "ppo": trainer_pb2.JOB_KIND_PPO,
}
TERMINAL_STATES = (
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_STOPPED,
    trainer_pb2.JOB_STATE_FAILED,
)


class ControlledJob(Protocol):
    """What the servicer needs of a job: its status, and thread-safe checkpoint and stop requests."""

    def status(self) -> trainer_pb2.JobStatus: ...

    def request_checkpoint(self) -> concurrent.futures.Future: ...

    def request_stop(self, reason: str) -> None: ...


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Thin adapter: reads the job's status, forwards checkpoint and stop requests to the training loop."""

    def __init__(self, job: ControlledJob):
        self.job = job
        self.loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[asyncio.Queue] = set()

    # called from the training thread
    def publish(self, status: trainer_pb2.JobStatus) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        data = status.SerializeToString()
        with contextlib.suppress(RuntimeError):  # loop shutting down
            self.loop.call_soon_threadsafe(self._fan_out, data)

    def _fan_out(self, data: bytes) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() > 1000:  # a stalled reader: drop the oldest
                queue.get_nowait()
            queue.put_nowait(data)

    async def GetStatus(self, request, context):
        return trainer_pb2.GetStatusResponse(status=self.job.status())

    async def StreamProgress(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            status = self.job.status()
            yield trainer_pb2.StreamProgressResponse(status=status)
            while status.state not in TERMINAL_STATES:
                status = trainer_pb2.JobStatus.FromString(await queue.get())
                yield trainer_pb2.StreamProgressResponse(status=status)
        finally:
            self._subscribers.discard(queue)

    async def SaveCheckpoint(self, request, context):
        future = self.job.request_checkpoint()
        checkpoint = await asyncio.wrap_future(future)
        return trainer_pb2.SaveCheckpointResponse(checkpoint=checkpoint)

    async def Stop(self, request, context):
        self.job.request_stop(request.reason or "Stop RPC")
        return trainer_pb2.StopResponse(status=self.job.status())


def server_thread(config: TrainJobConfig, servicer: TrainerServicer) -> ServerThread:
    """The TrainerService in a background thread of the training process (rlhf.core.server.ServerThread)."""

    async def load(handle: ServerHandle) -> None:
        servicer.loop = asyncio.get_running_loop()  # progress is published onto the server's loop

    service = ServiceDef(SERVICE_NAME, servicer, trainer_pb2_grpc.add_TrainerServiceServicer_to_server)
    return ServerThread(config, [service], load=load, name="trainer-grpc")
