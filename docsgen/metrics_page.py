"""docs/reference/metrics.md: every metric the bridge's registry exposes on ``/metrics``."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from bridge.metrics import MULTIPROCESS_DIR_VARIABLE, HydrationMetrics, Metrics
from docsgen.markdown import code, page, prose, table

# The series prometheus_client exposes for each type of metric.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
# How a metric's values from several worker processes become one (prometheus_client's
# multiprocess modes; counters and histograms are always summed).
ACROSS_WORKERS = {
    "counter": "summed",
    "histogram": "summed",
    "livesum": "summed over live workers",
    "livemin": "lowest of live workers",
    "livemax": "highest of live workers",
    "liveall": "one series per live worker",
    "sum": "summed",
    "min": "lowest",
    "max": "highest",
    "all": "one series per worker",
    "mostrecent": "most recently set",
    "livemostrecent": "most recently set by a live worker",
}
LISTED_VALUES = 10
"""Label values present from start-up are listed up to this many."""


def bridge_metrics() -> list[MetricWrapperBase]:
    """The metric objects of a fresh :class:`bridge.metrics.Metrics`, by name (run without
    ``PROMETHEUS_MULTIPROC_DIR``, as with one worker, so they are in its own registry)."""
    metrics = Metrics(secret_count=0)
    found = {
        value._name: value
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    }
    registered = {family.name for family in metrics.registry.collect()}
    if unreached := registered - set(found):
        raise ValueError(f"metrics in the registry but not on Metrics: {sorted(unreached)}")
    return [found[name] for name in sorted(found)]


def hydration_metrics() -> list[MetricWrapperBase]:
    """The metric objects of a fresh :class:`bridge.metrics.HydrationMetrics`, by name."""
    metrics = HydrationMetrics()
    found = {
        value._name: value
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    }
    return [found[name] for name in sorted(found)]


def kind(metric: MetricWrapperBase) -> str:
    """``counter``, ``gauge`` or ``histogram``."""
    return str(metric._type)


def exposed_names(metric: MetricWrapperBase) -> list[str]:
    return [metric._name + suffix for suffix in SUFFIXES[kind(metric)]]


def _values_at_start(metric: MetricWrapperBase) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {label: set() for label in metric._labelnames}
    for family in metric.collect():
        for sample in family.samples:
            for label in metric._labelnames:
                values[label].add(sample.labels[label])
    return values


def _labels(metric: MetricWrapperBase) -> str:
    cells = []
    for label, values in _values_at_start(metric).items():
        if not values:
            cells.append(code(label))
        elif len(values) <= LISTED_VALUES:
            cells.append(f"{code(label)}: " + ", ".join(code(value) for value in sorted(values)))
        else:
            cells.append(f"{code(label)} ({len(values)} values from start-up)")
    return "<br>".join(cells)


def _across_workers(metric: MetricWrapperBase) -> str:
    mode = getattr(metric, "_multiprocess_mode", kind(metric))
    return ACROSS_WORKERS[mode]


def _rows(metrics: list[MetricWrapperBase], *, across_workers: bool) -> list[list[str]]:
    return [
        [
            "<br>".join(code(name) for name in exposed_names(metric)),
            kind(metric),
            _labels(metric),
            prose(metric._documentation),
            *([_across_workers(metric)] if across_workers else []),
        ]
        for metric in metrics
    ]


def render() -> str:
    return page(
        "Metrics",
        "The bridge serves these in Prometheus' text format on `GET /metrics`. Series with a "
        "label are exported from zero for the label values listed, so `rate()` and "
        "`increase()` see their first event. With several worker processes "
        "(`BRIDGE_WORKERS`), the workers share their values through files in a directory "
        f"the bridge creates and names in {code(MULTIPROCESS_DIR_VARIABLE)}, and any "
        "worker's `/metrics` reports them combined as the last column says.",
        table(
            ("Name", "Type", "Labels", "Help", "Across workers"),
            _rows(bridge_metrics(), across_workers=True),
        ),
        "## The hydration worker",
        "`webhook-bridge hydrate` serves these on its own `/metrics` "
        "(`BRIDGE_HYDRATE_METRICS_PORT`), one process per worker.",
        table(("Name", "Type", "Labels", "Help"), _rows(hydration_metrics(), across_workers=False)),
    )
