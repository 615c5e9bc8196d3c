"""Pushes one export of every OpenTelemetry instrument kind to SecuMon with the real Python SDK.

Usage: export.py grpc|http ENDPOINT cumulative|delta RUN_ID

ENDPOINT is the OTLP/gRPC address (http://host:port) or the OTLP/HTTP base URL. RUN_ID becomes
service.instance.id, so each run's series are told apart. Exits non-zero if an export failed.
"""

import sys

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableGauge,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

protocol, endpoint, temporality_name, run_id = sys.argv[1:5]
temporality = {
    "cumulative": AggregationTemporality.CUMULATIVE,
    "delta": AggregationTemporality.DELTA,
}[temporality_name]
preferred = {
    Counter: temporality,
    UpDownCounter: AggregationTemporality.CUMULATIVE,
    Histogram: temporality,
    ObservableGauge: AggregationTemporality.CUMULATIVE,
}

if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    # https:// endpoints use TLS, trusting OTEL_EXPORTER_OTLP_CERTIFICATE when set.
    exporter = OTLPMetricExporter(
        endpoint=endpoint,
        insecure=not endpoint.startswith("https://"),
        preferred_temporality=preferred,
    )
else:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    exporter = OTLPMetricExporter(endpoint=endpoint + "/v1/metrics", preferred_temporality=preferred)

results = []
original_export = exporter.export


def recording_export(*args, **kwargs):
    result = original_export(*args, **kwargs)
    results.append(result)
    return result


exporter.export = recording_export

reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
provider = MeterProvider(
    resource=Resource.create(
        {"service.name": "pytest", "service.instance.id": run_id, "host.name": "ci-host"}
    ),
    metric_readers=[reader],
    views=[
        View(instrument_name="exp.latency", aggregation=ExponentialBucketHistogramAggregation())
    ],
)
meter = provider.get_meter("secumon.test", "1.0")

requests = meter.create_counter("requests", unit="{request}", description="Requests served")
requests.add(5, {"route": "/a"})
requests.add(2, {"route": "/b"})

depth = meter.create_up_down_counter("queue.depth", description="Items waiting")
depth.add(3)
depth.add(-1)

latency = meter.create_histogram("http.latency", unit="s", description="Request latency")
latency.record(0.2, {"route": "/a"})
latency.record(3.0, {"route": "/a"})

exp_latency = meter.create_histogram("exp.latency", unit="ms")
exp_latency.record(5)
exp_latency.record(50)

meter.create_observable_gauge(
    "room.temperature",
    callbacks=[lambda options: [Observation(21.5, {"room": "lab"})]],
    unit="Cel",
)

provider.force_flush()
provider.shutdown()
if not results or any(r != MetricExportResult.SUCCESS for r in results):
    print(f"export failed: {results}", file=sys.stderr)
    sys.exit(1)
print("exported", len(results))
