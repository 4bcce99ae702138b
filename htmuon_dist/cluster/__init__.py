"""Cluster glue: turn SLURM / Kubernetes / torchrun-style environments into ``accelerate launch``.

:mod:`.hostlist` expands SLURM's compressed node lists; :mod:`.launch_env` resolves the
topology (nodes, node rank, processes per node, rendezvous address) from the environment and
builds the ``accelerate launch`` command (``python -m htmuon_dist.cluster.launch_env --help``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["expand_hostlist", "LaunchEnvError", "Topology", "build_command", "resolve_topology"]


def __getattr__(name: str) -> Any:
    # Lazy: an eager import of launch_env here makes ``python -m htmuon_dist.cluster.launch_env``
    # execute a module that is already in sys.modules (runpy warns about exactly that).
    if name == "expand_hostlist":
        from .hostlist import expand_hostlist

        return expand_hostlist
    if name in __all__:
        from . import launch_env

        return getattr(launch_env, name)
    raise AttributeError(name)
