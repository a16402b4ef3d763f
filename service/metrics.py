"""Prometheus metrics. Queue and job figures are read from the database at scrape
time (the database is the queue, so they are right whichever process changed them);
HTTP figures are counted in this process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.db import get_sessionmaker
from service.erasure_requests.models import ErasureRequest
from service.jobs.models import Job
from service.models_registry.models import RegisteredModel
from service.states import JobStage, RequestStatus

REGISTRY = CollectorRegistry()
HTTP_REQUESTS = Counter(
    "unlearn_http_requests",
    "HTTP requests handled",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "unlearn_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
JOB_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with get_sessionmaker()() as session:
            by_status = dict(
                session.execute(
                    select(ErasureRequest.status, func.count()).group_by(ErasureRequest.status)
                ).all()
            )
            requests = GaugeMetricFamily(
                "unlearn_erasure_requests", "Erasure requests by status", labels=["status"]
            )
            for status in RequestStatus:
                requests.add_metric([status.value], by_status.get(status.value, 0))
            yield requests

            depth = GaugeMetricFamily(
                "unlearn_queue_depth",
                "Requests waiting for a worker (received or queued), per model",
                labels=["model"],
            )
            waiting = session.execute(
                select(RegisteredModel.name, func.count(ErasureRequest.id))
                .join(ErasureRequest, ErasureRequest.model_id == RegisteredModel.id)
                .where(ErasureRequest.status.in_(["received", "queued"]))
                .group_by(RegisteredModel.name)
            ).all()
            for name, count in waiting:
                depth.add_metric([name], count)
            yield depth

            stages = dict(
                session.execute(select(Job.stage, func.count()).group_by(Job.stage)).all()
            )
            jobs = GaugeMetricFamily("unlearn_jobs", "Jobs by stage", labels=["stage"])
            for stage in JobStage:
                jobs.add_metric([stage.value], stages.get(stage.value, 0))
            yield jobs

            durations = [
                (finished - started).total_seconds()
                for started, finished in session.execute(
                    select(Job.started_at, Job.finished_at).where(
                        Job.stage == JobStage.SUCCEEDED.value, Job.started_at.is_not(None)
                    )
                ).all()
                if started is not None and finished is not None
            ]
        hist = HistogramMetricFamily(
            "unlearn_job_duration_seconds", "Wall time of succeeded jobs, claim to publish"
        )
        buckets = [(str(b), sum(1 for d in durations if d <= b)) for b in JOB_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        hist.add_metric([], buckets, sum_value=sum(durations))
        yield hist


REGISTRY.register(DatabaseCollector())


def render() -> bytes:
    return generate_latest(REGISTRY)
