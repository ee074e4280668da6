"""The Ray session of a search: start a local instance or join a cluster, with
token authentication on and the dashboard off unless asked for."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdtune.errors import KdtuneError
from kdtune.search.private_apis import reload_ray_auth_mode

Log = Callable[[str], None]


def _quiet_ray_environment() -> None:
    # The new console output prints a config table per trial even at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray's experiment state keeps its own period (TUNE_GLOBAL_CHECKPOINT_S, 10 s
    # or more): kdtune's trial records, written as each trial ends, are what make
    # a killed search lose nothing (see kdtune.records).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")

def ray_init_kwargs(address: str | None, dashboard: bool, num_cpus: int | None = None,
                    runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments kdtune passes to ``ray.init``.

    Token authentication is never turned off: kdtune sets no auth option at all,
    so Ray 2.59+ enables it for the local cluster it starts. The dashboard (an
    HTTP server that accepts jobs) is off unless asked for, and then bound to
    127.0.0.1 only. Joining ``address`` passes no resource counts (Ray forbids
    them when connecting to an existing cluster). ``runtime_env`` (the plugins'
    ``py_modules``, :func:`kdtune.core.plugins.plugin_runtime_env`) applies to every
    worker of the session, on every node, local or joined.
    """
    kwargs: dict[str, Any] = dict(
        include_dashboard=dashboard, logging_level=logging.WARNING, log_to_driver=False,
        configure_logging=True,
    )
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    return kwargs

def ray_auth_environment(address: str | None, environ: dict[str, str], home: Path) -> dict[str, str]:
    """Environment variables to set before joining ``address`` so that the token is sent.

    Ray enables token authentication on the client side only for clusters it finds
    itself (no address, or "auto"); joining an explicit ``host:port`` sends no token,
    and a cluster with token auth refuses the connection. When a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)
    and ``RAY_AUTH_MODE`` is unset, this turns token mode on. It never turns it off.
    """
    if not address or address == "auto" or address.startswith("ray://") or "RAY_AUTH_MODE" in environ:
        return {}
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool(environ.get("RAY_AUTH_TOKEN")) or (token_path is not None and Path(token_path).is_file()) \
        or (home / ".ray" / "auth_token").is_file()
    return {"RAY_AUTH_MODE": "token"} if has_token else {}

@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool, log: Log,
                runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Start a local Ray instance (or join ``address``) and shut it down afterwards.

    The local default keeps Ray's token authentication on and the dashboard off;
    ``dashboard=True`` binds it to 127.0.0.1 only (see :func:`ray_init_kwargs`).
    An already initialised Ray (a notebook, kdtune's tests) is reused and left running;
    kdtune cannot give it ``runtime_env``, so plugins then reach workers only from
    the driver's disk (see :func:`kdtune.core.plugins.import_plugins`).
    """
    import ray

    _quiet_ray_environment()
    if ray.is_initialized():
        if runtime_env:
            log("note: Ray was started before kdtune, so the plugins are not shipped with Ray's runtime "
                "environment; workers import them from their paths on this machine")
        yield
        return
    if address:
        auth = ray_auth_environment(address, dict(os.environ), Path.home())
        if auth:
            os.environ.update(auth)
            # Ray reads RAY_AUTH_MODE once, at import; re-read it as Ray's own
            # token setup does after changing it.
            reload_ray_auth_mode()
        log(f"joining the Ray cluster at {address}")
    try:
        ray.init(**ray_init_kwargs(address, dashboard, runtime_env=runtime_env))
    except ConnectionError as exc:
        if not address:
            raise
        raise KdtuneError(f"--address {address}: cannot connect to a Ray cluster there ({exc}); "
                          f"check the address and that this machine has the cluster's auth token") from None
    try:
        yield
    finally:
        ray.shutdown()

def known_cluster_resources(address: str | None) -> dict[str, float] | None:
    """The resources of the cluster a search will use, if known without starting Ray:
    an already initialised Ray's, or what a new local instance will have (all CPUs,
    the visible GPUs). None when joining another cluster."""
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if address:
        return None
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
