"""[daemon]: how this host's daemon runs (its consumer name, processes, timings, log level)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowd.core.config.model import DaemonConfig, listen_address
from flowd.core.config.section import Section, non_empty, non_negative, positive

__all__ = ["address_problem", "read_daemon"]


def address_problem(value: str) -> str | None:
    if not value:
        return None
    try:
        listen_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def read_daemon(path: Path, table: Any) -> DaemonConfig:
    section = Section(path, table, prefix="daemon.", known={
        "consumer", "cpu_workers", "claim_idle_ms", "shutdown_timeout", "metrics", "log_level",
        "processes", "control_interval_s", "registry_ttl_s"})
    d = DaemonConfig()
    log_level = section.get("log_level", str, d.log_level)
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        section.fail("log_level", f"{log_level!r} must be one of debug, info, warning, error")
    return DaemonConfig(
        consumer=section.get("consumer", str, d.consumer, non_empty),
        cpu_workers=section.get("cpu_workers", int, d.cpu_workers, positive),
        claim_idle_ms=section.get("claim_idle_ms", int, d.claim_idle_ms, positive),
        shutdown_timeout=float(section.get("shutdown_timeout", (int, float), d.shutdown_timeout,
                                           non_negative)),
        metrics=section.get("metrics", str, d.metrics, address_problem),
        log_level=log_level.lower(),
        processes=section.get("processes", int, d.processes, positive),
        control_interval_s=float(section.get("control_interval_s", (int, float),
                                             d.control_interval_s, _control_interval)),
        registry_ttl_s=float(section.get("registry_ttl_s", (int, float), d.registry_ttl_s,
                                         _registry_ttl)),
    )


def _control_interval(value: float) -> str | None:
    if not 0 < value <= 1:
        return f"{value!r} must be above 0 and at most 1 (a pause must apply within a second)"
    return None


def _registry_ttl(value: float) -> str | None:
    return None if value >= 1 else f"{value!r} must be at least 1 (second)"
