"""The app's Prometheus metrics: request counts and latency by route template, and values read at
scrape time (upscale queue depth, jobs by state, stage durations)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import func, select

from store.jobs import JOB_STATES
from store.tables import Job

if TYPE_CHECKING:
    from api.deps import Services


class Metrics:
    """The app's own Prometheus registry (no global default registry: two apps never collide)."""

    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "srcompress_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "srcompress_http_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(services))


class _ServiceCollector:
    """Values read at scrape time: upscale queue depth, jobs by state, stage durations."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Any]:
        pool = self.services.upscale_pool
        queue = GaugeMetricFamily(
            "srcompress_upscale_queue_depth", "Upscale requests admitted and not finished."
        )
        queue.add_metric([], pool.admitted if pool is not None else 0)
        yield queue

        jobs = GaugeMetricFamily("srcompress_jobs", "Jobs by state.", labels=["state"])
        stages = SummaryMetricFamily(
            "srcompress_stage_duration_seconds",
            "Pipeline stage durations of succeeded jobs.",
            labels=["stage"],
        )
        try:
            with self.services.read_sessions() as session:
                counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                reports = session.execute(
                    select(Job.report)
                    .where(Job.state == "succeeded")
                    .order_by(Job.finished_at.desc())
                    .limit(500)
                ).scalars()
                totals: dict[str, list[float]] = {}
                for report in reports:
                    for stage, seconds in ((report or {}).get("stage_seconds") or {}).items():
                        totals.setdefault(stage, []).append(float(seconds))
        except Exception:  # a scrape must not fail because the database is down; /readyz reports that
            counts, totals = {}, {}
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        for stage, values in totals.items():
            stages.add_metric([stage], len(values), sum(values))
        yield stages
