"""How a Ray job sits on the cluster: how many model replicas, with what GPU and CPU share each, and how
many decode tasks at once; and the placement group that holds one pass's replicas."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup

from .cluster import RayEngineError


@dataclass(frozen=True)
class RayOptions:
    """How the job uses Ray."""

    address: str | None = None  # None: start Ray on this machine; "auto" or HOST:PORT: join a cluster
    gpu_workers: int | None = None  # model replicas; default: one per GPU (one on CPUs without GPUs)
    decode_cpus: int | None = None  # decode tasks at once; default: the CPUs the replicas leave
    no_progress_timeout_s: float = 600.0  # a pass that moves nothing this long ends (a hang); -1: never
    reorder_window: int = 4096  # results held back to keep submission order


@dataclass(frozen=True)
class Placement:
    """How the job sits on the cluster."""

    replicas: int
    replica_gpus: int  # 1, or 0 for replicas on CPUs
    replica_cpus: float
    decode_cpus: int
    device: str  # where each replica builds its answerer

    @property
    def device_type(self) -> str:
        """The kind of device the replicas compute on."""
        return "cuda" if self.replica_gpus else "cpu"


def plan_placement(nodes: list[dict[str, float]], device: str, options: RayOptions) -> Placement:
    """Size the job from the alive nodes' resources: one replica per GPU unless told otherwise; on a GPU
    node a replica never takes the CPU that decoding needs, or decode tasks would wait forever."""
    if device.startswith("cuda:"):
        raise RayEngineError("with --engine ray every model replica has one GPU: use --device auto or cuda")
    cpus = int(sum(node.get("CPU", 0) for node in nodes))
    gpus = int(sum(node.get("GPU", 0) for node in nodes))
    on_gpu = gpus > 0 and device != "cpu"
    if device == "cuda" and not on_gpu:
        raise RayEngineError("--device cuda asked for, but the Ray cluster has no GPUs")
    replicas = options.gpu_workers or (gpus if on_gpu else 1)
    if on_gpu and replicas > gpus:
        raise RayEngineError(f"{replicas} GPU workers asked for, but the Ray cluster has {gpus} GPUs")
    if options.decode_cpus and options.decode_cpus > cpus:
        raise RayEngineError(f"{options.decode_cpus} decode CPUs asked for, but the Ray cluster has {cpus}")
    if on_gpu:
        share = min((node.get("CPU", 0) - 1) / node["GPU"] for node in nodes if node.get("GPU", 0) >= 1)
        replica_cpus = max(0.0, min(1.0, share))
        decode_cpus = options.decode_cpus or max(1, math.floor(cpus - replicas * replica_cpus))
        return Placement(replicas, 1, replica_cpus, decode_cpus, device)
    decode_cpus = options.decode_cpus or replicas
    if cpus - decode_cpus <= 0:
        raise RayEngineError(f"no CPU left for the model: the Ray cluster has {cpus}; lower --decode-cpus")
    return Placement(replicas, 0, (cpus - decode_cpus) / replicas, decode_cpus, "cpu")


def reserve(placement: Placement, replicas: int) -> PlacementGroup:
    """A placement group of one bundle per replica (its GPU and CPU share), for one pass."""
    bundle = {"GPU": placement.replica_gpus, "CPU": placement.replica_cpus}
    return ray.util.placement_group([{k: v for k, v in bundle.items() if v}] * replicas)
