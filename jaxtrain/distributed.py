"""Several processes, one training run: a thin wrapper over ``jax.distributed``.

Every process runs the same program. After `initialize`, ``jax.devices()`` lists the
devices of *all* processes, a mesh over them (`jaxtrain.data_mesh`,
`jaxtrain.make_mesh`) spans the machines, and ``jax.jit`` runs each step as one SPMD
program whose gradient all-reduce crosses machines (NCCL on GPUs, the TPU interconnect,
gloo on CPUs). `jaxtrain.fit` then feeds each process its own rows of every global
batch, computes global metrics, has all processes write each checkpoint together
(orbax) and lets only process 0 print and write logs.

What must not live here: meshes and placement (`jaxtrain.parallel`). It never imports the
loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the run.

    Attributes:
        process_index: this process's index, ``0 .. process_count - 1``.
        process_count: the number of processes.
        local_device_count: devices attached to this process.
        device_count: devices of all processes.

    Example:
        >>> info = process_info()
        >>> info.process_index < info.process_count, info.local_device_count <= info.device_count
        (True, True)
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int

    @property
    def is_primary(self) -> bool:
        """True on process 0, the one that prints and writes logs."""
        return self.process_index == 0


def process_info() -> ProcessInfo:
    """The `ProcessInfo` of this process (one process unless `initialize` ran).

    Returns:
        ``ProcessInfo(process_index, process_count, local_device_count, device_count)``.

    Example:
        >>> process_info().process_count
        1
    """
    return ProcessInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer; got {raw!r}. "
            f"Fix: e.g. {name}=0, or unset it."
        ) from None


def requested(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Whether a multi-process run was asked for, by arguments or environment variables.

    Args:
        coordinator_address: as in `initialize`.
        num_processes: as in `initialize`.
        process_id: as in `initialize`.

    Returns:
        True when any argument is given or any of ``JAX_COORDINATOR_ADDRESS``,
        ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` is set.

    Example:
        >>> requested(num_processes=2)
        True
    """
    return any(v is not None for v in (coordinator_address, num_processes, process_id)) or any(
        os.environ.get(n) for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> ProcessInfo:
    """Joins this process to a multi-process run (``jax.distributed.initialize``).

    Call it first, before any other JAX call, in every process. Missing arguments come
    from the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; anything still missing is left to JAX's cluster
    auto-detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes), so on a TPU pod
    slice ``initialize()`` with no arguments is enough. Calling it again in the same
    process returns the same `ProcessInfo`.

    Args:
        coordinator_address: ``host:port`` of process 0, reachable from every process
            (process 0 listens on that port).
        num_processes: the number of processes.
        process_id: this process's index, ``0 .. num_processes - 1``.
        local_device_ids: restrict this process to these local accelerators (e.g.
            one process per GPU); default all.
        cpu_collectives: cross-process collectives on the CPU backend
            (``jax_cpu_collectives_implementation``): ``"gloo"`` (default), ``"mpi"``,
            or None to leave JAX's setting alone. Unused on GPU and TPU.
        initialization_timeout: seconds to wait for all processes to connect.

    Returns:
        The `ProcessInfo` of this process.

    Raises:
        ValueError: a bad argument or environment variable, or nothing to go on
            (no coordinator given and no cluster detected).
        RuntimeError: JAX was already used in this process.

    Example:
        >>> # On each of 2 machines (process_id 0 and 1):
        >>> info = initialize("10.0.0.1:1234", 2, 0)  # doctest: +SKIP
        >>> info.device_count  # doctest: +SKIP
        16
        >>> initialize("10.0.0.1", 2, 0)  # arguments are checked before JAX is touched
        Traceback (most recent call last):
        ...
        ValueError: coordinator_address must be host:port ...
    """
    if jax.distributed.is_initialized():
        return process_info()
    coordinator_address, num_processes, process_id = _resolve(
        coordinator_address, num_processes, process_id
    )
    if cpu_collectives is not None and "jax_cpu_collectives_implementation" in jax.config.values:
        # Must be set before the CPU backend starts; without it, a CPU computation that
        # spans processes has no way to exchange data.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    _join(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return process_info()


def _resolve(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None]:
    """`initialize`'s arguments, missing ones read from the environment, checked.

    Raises:
        ValueError: a bad argument or environment variable (checked before JAX is touched).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ValueError(f"num_processes must be an integer >= 1; got {num_processes!r}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, num_processes) = [0, {num_processes}); got "
            f"{process_id}. Fix: number the processes 0 .. {num_processes - 1}."
        )
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(
            f"coordinator_address must be host:port (process 0's address and a free port); "
            f"got {coordinator_address!r}. Fix: e.g. 10.0.0.1:1234."
        )
    return coordinator_address, num_processes, process_id


def _join(
    *,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_ids: list[int] | None,
    initialization_timeout: int,
) -> None:
    """``jax.distributed.initialize`` with these arguments, its errors explained.

    Raises:
        ValueError: nothing to go on (no coordinator given and no cluster detected).
        RuntimeError: JAX was already used in this process.
    """
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )
    except ValueError as e:
        raise ValueError(
            f"cannot start the multi-process run: {e} No cluster (TPU pod, SLURM, Open MPI) "
            "was detected, so give all three of coordinator_address, num_processes and "
            f"process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})."
        ) from None
    except RuntimeError as e:
        if "before" in str(e):
            raise RuntimeError(
                "jaxtrain.distributed.initialize must run before any other JAX call in the "
                f"process (JAX says: {e}). Fix: call it first thing in the program."
            ) from None
        raise


def shutdown() -> None:
    """Leaves the multi-process run (optional: JAX also does it at exit).

    Returns:
        None; does nothing when `initialize` was not called.

    Example:
        >>> shutdown()  # a no-op in a single-process run
    """
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
