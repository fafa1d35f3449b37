"""The router's side of worker membership: registration, heartbeats, the cluster status, and
the registry's upkeep (silent workers expired, static workers polled for their load).

Workers register with their role, address, model fingerprint, preprocessing version and KV
layout, then heartbeat their load; `maintain` runs once per heartbeat interval. This module
turns those messages into the registry's plain types (`pdserve.routing.registry`) and back.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.errors import InvalidRequestError
from pdserve.kv_transfer.codec import fingerprint_str
from pdserve.routing.registry import Health, Load, Registry, Role, WorkerInfo
from pdserve.server import daemon, wire
from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, router_pb2

log = logging.getLogger("pdserve.router")

_ROLES = {common_pb2.WORKER_ROLE_PREFILL: Role.PREFILL, common_pb2.WORKER_ROLE_DECODE: Role.DECODE}
_ROLES_PB = {v: k for k, v in _ROLES.items()}
_HEALTH_PB = {Health.HEALTHY: router_pb2.WORKER_HEALTH_HEALTHY, Health.DRAINING: router_pb2.WORKER_HEALTH_DRAINING,
              Health.UNHEALTHY: router_pb2.WORKER_HEALTH_UNHEALTHY}


def load_from_pb(pb: common_pb2.WorkerLoad) -> Load:
    return Load(num_running=pb.num_running_requests, num_waiting=pb.num_waiting_requests,
                num_pending_prefill_tokens=pb.num_pending_prefill_tokens, kv_num_total=pb.kv.num_total,
                kv_num_free=pb.kv.num_free, kv_num_cached=pb.kv.num_cached, kv_block_size=pb.kv.block_size,
                kv_prefix_hit_rate=pb.kv.prefix_cache_hit_rate, output_tokens_per_s=pb.output_tokens_per_s,
                prefill_tokens_per_s=pb.prefill_tokens_per_s, p99_ttft_ms=pb.p99_ttft_ms, p99_itl_ms=pb.p99_itl_ms)


def load_to_pb(load: Load) -> common_pb2.WorkerLoad:
    kv = common_pb2.KVStats(block_size=load.kv_block_size, num_total=load.kv_num_total, num_free=load.kv_num_free,
                            num_used=load.kv_num_total - load.kv_num_free, num_cached=load.kv_num_cached,
                            prefix_cache_hit_rate=load.kv_prefix_hit_rate)
    return common_pb2.WorkerLoad(num_running_requests=load.num_running, num_waiting_requests=load.num_waiting,
                                 num_pending_prefill_tokens=load.num_pending_prefill_tokens, kv=kv,
                                 output_tokens_per_s=load.output_tokens_per_s,
                                 prefill_tokens_per_s=load.prefill_tokens_per_s, p99_ttft_ms=load.p99_ttft_ms,
                                 p99_itl_ms=load.p99_itl_ms)



class Membership:
    """Which workers exist, how loaded they are, and what they registered with."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # worker id -> its registration (fingerprint, preprocessing version, KV layout), for the status.
        self._registrations: dict[str, router_pb2.RegisterRequest] = {}

    def register(self, request: router_pb2.RegisterRequest) -> router_pb2.RegisterResponse:
        """Raises PdserveError for a registration the router cannot take."""
        role = _ROLES.get(request.role)
        if role is None:
            raise InvalidRequestError("role", "must be prefill or decode")
        info = WorkerInfo(role, request.address, fingerprint_str(request.model),
                          request.preprocessing_version or None, wire.layout_str(request.kv_layout),
                          request.version)
        worker_id = self.registry.register(request.worker_id or None, info, load_from_pb(request.load))
        self._registrations[worker_id] = request
        log.info("registered %s %s at %s (%s)", role.value, worker_id, request.address, info.model_fingerprint)
        interval = self.registry.heartbeat_interval_s
        return router_pb2.RegisterResponse(worker_id=worker_id, heartbeat_interval_ms=int(interval * 1e3),
                                           heartbeat_timeout_ms=int(self.registry.heartbeat_timeout_s * 1e3))

    def heartbeat(self, request: router_pb2.HeartbeatRequest) -> router_pb2.HeartbeatResponse:
        known = self.registry.heartbeat(request.worker_id, load_from_pb(request.load), request.draining)
        return router_pb2.HeartbeatResponse(reregister=not known)

    def status(self) -> router_pb2.ClusterStatusResponse:
        now = time.monotonic()
        empty = router_pb2.RegisterRequest()
        workers = []
        for w in self.registry.all():
            reg = self._registrations.get(w.worker_id, empty)
            workers.append(router_pb2.WorkerStatus(
                worker_id=w.worker_id, role=_ROLES_PB[w.role], address=w.address, health=_HEALTH_PB[w.health],
                load=load_to_pb(w.load), model=reg.model if reg.HasField("model") else None,
                preprocessing_version=reg.preprocessing_version,
                kv_layout=reg.kv_layout if reg.HasField("kv_layout") else None,
                last_heartbeat_age_ms=(now - w.last_heartbeat) * 1e3, version=w.info.version))
        return router_pb2.ClusterStatusResponse(workers=workers)

    async def maintain(self) -> None:
        """Expire silent workers and poll static ones, once per heartbeat interval."""
        while True:
            for worker_id in self.registry.expire():
                log.warning("worker %s missed its heartbeats", worker_id)
            known = {w.worker_id for w in self.registry.all()}
            for worker_id in self._registrations.keys() - known:  # removed after a long silence
                del self._registrations[worker_id]
            await asyncio.gather(*(self._poll(w) for w in self.registry.all() if w.static),
                                 return_exceptions=True)
            await asyncio.sleep(self.registry.heartbeat_interval_s)

    async def _poll(self, worker) -> None:
        stub_cls = (prefill_pb2_grpc.PrefillServiceStub if worker.role == Role.PREFILL
                    else decode_pb2_grpc.DecodeServiceStub)
        try:
            stats = await stub_cls(daemon.channel(worker.address)).Stats(common_pb2.StatsRequest(), timeout=2.0)
            self.registry.heartbeat(worker.worker_id, load_from_pb(stats.load))
        except grpc.aio.AioRpcError:
            self.registry.mark_failed(worker.worker_id)
