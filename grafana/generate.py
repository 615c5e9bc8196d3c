#!/usr/bin/env python3
"""Writes grafana/dashboards/*.json: the dashboards are code, so their panels, variables and
queries stay consistent (one datasource, one host selector, one way to write a rate).

    python3 grafana/generate.py          # rewrite the JSON files
    python3 grafana/generate.py --check  # exit 1 if a file differs from what this writes

The integration test `grafana::` runs every query of every dashboard against a server fed by
the real agent, and checks that the files are what this script writes.
"""

import json
import pathlib
import sys

DATASOURCE = {"type": "prometheus", "uid": "secumon"}
HOST = 'job="secumon-agent",instance=~"$instance"'


class Layout:
    """Places panels left to right, 24 columns wide, rows of `height`."""

    def __init__(self):
        self.x, self.y, self.row_height, self.next_id = 0, 0, 0, 1

    def place(self, width, height):
        if self.x + width > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        self.next_id += 1
        return self.next_id - 1, pos


def target(expr, legend="", ref="A", instant=False):
    t = {"datasource": DATASOURCE, "expr": expr, "refId": ref, "legendFormat": legend}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    return t


def panel(layout, kind, title, targets, unit="short", width=12, height=8, description="", extra=None,
          may_be_empty=False):
    panel_id, pos = layout.place(width, height)
    p = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "lineWidth": 1}
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    if extra:
        p.update(extra)
    if may_be_empty:
        # Read by the test that runs every query: this panel may rightly show nothing.
        p["secumonMayBeEmpty"] = True
    return p


def query_variable(name, label, query, hide=0, include_all=True, multi=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-query"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "allValue": ".+",
        "hide": hide,
        "current": {},
        "options": [],
    }


def dashboard(uid, title, description, panels, variables, tags):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": panels,
    }


def rate(metric, selector=HOST):
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def host_overview():
    l = Layout()
    panels = [
        panel(l, "stat", "Uptime", [target(f"system_uptime_seconds{{{HOST}}}")],
              unit="s", width=6, height=4),
        panel(l, "stat", "Logical CPUs", [target(f'count by (instance) (system_cpu_time_seconds_total{{{HOST},state="idle"}})')],
              width=6, height=4),
        panel(l, "stat", "Memory", [target(f"system_memory_limit_bytes{{{HOST}}}")], unit="bytes", width=6, height=4),
        panel(l, "stat", "Processes", [target(f"sum by (instance) (system_processes_count{{{HOST}}})")], width=6, height=4),
        panel(l, "timeseries", "CPU by state (cores busy)",
              [target("sum by (state) (" + rate("system_cpu_time_seconds_total", HOST + ',state!="idle"') + ")", "{{state}}")],
              description="CPU seconds per second in each state but idle: 1 is one core fully busy."),
        panel(l, "timeseries", "CPU utilisation by core",
              [target(f'1 - avg by (cpu) (system_cpu_utilization_ratio{{{HOST},state="idle"}})', "{{cpu}}")], unit="percentunit"),
        panel(l, "timeseries", "Load average",
              [target(f"avg(system_cpu_load_average_1m{{{HOST}}})", "1m"),
               target(f"avg(system_cpu_load_average_5m{{{HOST}}})", "5m"),
               target(f"avg(system_cpu_load_average_15m{{{HOST}}})", "15m")]),
        panel(l, "timeseries", "Memory by state",
              [target(f'sum by (state) (system_memory_usage_bytes{{{HOST},state=~"used|free|buffered|cached"}})', "{{state}}")],
              unit="bytes", extra={"fieldConfig": {"defaults": {"unit": "bytes", "custom": {"stacking": {"mode": "normal"}, "fillOpacity": 40}}, "overrides": []}}),
        panel(l, "timeseries", "Swap",
              [target(f"sum by (state) (system_paging_usage_bytes{{{HOST}}})", "{{state}}")], unit="bytes",
              description="Empty when the host has no swap.", may_be_empty=True),
        panel(l, "timeseries", "Paging and page faults",
              [target(f'sum by (direction, type) ({rate("system_paging_operations_total")})', "{{type}} {{direction}}"),
               target(f'sum by (type) ({rate("system_paging_faults_total")})', "{{type}} faults")], unit="ops"),
        panel(l, "bargauge", "Filesystem used",
              [target(f"max by (mountpoint) (system_filesystem_utilization_ratio{{{HOST}}})", "{{mountpoint}}")],
              unit="percentunit", extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
        panel(l, "bargauge", "Inodes used",
              [target(f'sum by (mountpoint) (system_filesystem_inodes_usage{{{HOST},state="used"}}) / sum by (mountpoint) (system_filesystem_inodes_usage{{{HOST}}})', "{{mountpoint}}")],
              unit="percentunit", extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
        panel(l, "timeseries", "Disk I/O",
              [target(f"sum by (device, direction) ({rate('system_disk_io_bytes_total')})", "{{device}} {{direction}}")], unit="Bps"),
        panel(l, "timeseries", "Disk busy",
              [target(f"sum by (device) ({rate('system_disk_io_time_seconds_total')})", "{{device}}")], unit="percentunit",
              description="Share of time the device had I/O in flight."),
        panel(l, "timeseries", "Network",
              [target(f"sum by (device, direction) ({rate('system_network_io_bytes_total')})", "{{device}} {{direction}}")], unit="Bps"),
        panel(l, "timeseries", "Network errors and drops",
              [target(f"sum by (device, direction) ({rate('system_network_errors_total')})", "{{device}} {{direction}} errors"),
               target(f"sum by (device, direction) ({rate('system_network_dropped_total')})", "{{device}} {{direction}} dropped")],
              unit="pps", description="Flat at zero on a healthy host."),
        panel(l, "timeseries", "TCP connections by state",
              [target(f'sum by (state) (system_network_connections{{{HOST},protocol="tcp"}}) > 0', "{{state}}")]),
        panel(l, "timeseries", "Processes by status",
              [target(f"sum by (status) (system_processes_count{{{HOST}}})", "{{status}}")]),
        panel(l, "table", "Top processes by CPU",
              [target(f"topk(10, sum by (process_executable_name, process_pid, process_owner) ({rate('process_cpu_time_seconds_total')}))",
                      instant=True)], unit="percentunit"),
        panel(l, "table", "Top processes by memory",
              [target(f"topk(10, max by (process_executable_name, process_pid, process_owner) (process_memory_usage_bytes{{{HOST}}}))",
                      instant=True)], unit="bytes"),
    ]
    variables = [
        query_variable("host", "Host", 'label_values(target_info{job="secumon-agent"}, host_name)'),
        query_variable("instance", "Agent", 'label_values(target_info{job="secumon-agent",host_name=~"$host"}, instance)', hide=2),
    ]
    return dashboard("secumon-host", "Host overview",
                     "One host as secumon-agent reads it (OpenTelemetry hostmetrics names).",
                     panels, variables, ["secumon", "host"])


def fleet_overview():
    l = Layout()
    joined = 'on (instance) group_left (host_name) target_info{job="secumon-agent"}'
    panels = [
        panel(l, "stat", "Agents online", [target("sum(secumon_agent_up)")], width=6, height=4),
        panel(l, "stat", "Agents offline", [target("count(secumon_agent_up == 0) or vector(0)")], width=6, height=4,
              description="Registered agents not heard from within three heartbeats."),
        panel(l, "stat", "Agents", [target("count(secumon_agent_up)")], width=6, height=4),
        panel(l, "stat", "Versions", [target("count(count by (agent_version) (secumon_agent_up))")], width=6, height=4),
        panel(l, "timeseries", "Agents up and down",
              [target("sum(secumon_agent_up)", "up"), target("count(secumon_agent_up == 0) or vector(0)", "down")]),
        panel(l, "piechart", "Agents by version",
              [target("count by (agent_version) (secumon_agent_up)", "{{agent_version}}", instant=True)]),
        panel(l, "table", "Last seen",
              [target("time() - secumon_agent_last_seen_timestamp_seconds", instant=True)], unit="s", width=24,
              description="Seconds since each agent was last heard from."),
        panel(l, "bargauge", "Busiest hosts: CPU",
              [target(f'topk(10, (1 - avg by (instance) (system_cpu_utilization_ratio{{job="secumon-agent",state="idle"}})) * {joined})', "{{host_name}}", instant=True)],
              unit="percentunit", width=8, extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
        panel(l, "bargauge", "Busiest hosts: memory",
              [target(f'topk(10, sum by (instance) (system_memory_utilization_ratio{{job="secumon-agent",state="used"}}) * {joined})', "{{host_name}}", instant=True)],
              unit="percentunit", width=8, extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
        panel(l, "bargauge", "Fullest filesystems",
              [target(f'topk(10, max by (instance, mountpoint) (system_filesystem_utilization_ratio{{job="secumon-agent"}}) * {joined})', "{{host_name}} {{mountpoint}}", instant=True)],
              unit="percentunit", width=8, extra={"options": {"orientation": "horizontal", "displayMode": "gradient"}}),
    ]
    return dashboard("secumon-fleet", "Fleet overview",
                     "Every agent of the tenant: which are up, what they run, the busiest hosts.",
                     panels, [], ["secumon", "fleet"])


SELF = 'job="secumon",instance=~"$instance"'


def secumon_itself():
    l = Layout()

    def by(labels, metric, selector=SELF):
        return f"sum by ({labels}) ({rate(metric, selector)})"

    gradient = {"options": {"orientation": "horizontal", "displayMode": "gradient"}}
    panels = [
        panel(l, "stat", "Uptime", [target(f"time() - max(process_start_time_seconds{{{SELF}}})")], unit="s", width=4, height=4),
        panel(l, "stat", "Version", [target(f"count by (version) (secumon_build_info{{{SELF}}})", "{{version}}", instant=True)],
              width=4, height=4, extra={"options": {"textMode": "name", "reduceOptions": {"fields": "/^version$/", "values": True}}}),
        panel(l, "stat", "Samples stored per second", [target(f"sum({rate('secumon_samples_ingested_total', SELF)})")],
              unit="short", width=4, height=4),
        panel(l, "stat", "Series in memory", [target(f"sum(secumon_storage_series_in_memory{{{SELF}}})")], width=4, height=4),
        panel(l, "stat", "Live-feed clients", [target(f"sum(secumon_live_clients{{{SELF}}})")], width=4, height=4),
        panel(l, "stat", "Resident memory", [target(f"sum(process_resident_memory_bytes{{{SELF}}})")], unit="bytes", width=4, height=4),
        # Ingest
        panel(l, "timeseries", "Samples stored by protocol",
              [target(by("protocol", "secumon_samples_ingested_total"), "{{protocol}}")], unit="short",
              description="remote_write, otlp, fleet (agent status series), self (this server's own metrics)."),
        panel(l, "timeseries", "Samples refused by reason",
              [target(by("protocol, reason", "secumon_samples_rejected_total"), "{{protocol}} {{reason}}")], unit="short",
              description="Empty while nothing is refused: out_of_order, too_old, too_far_in_future, series_limit, rate_limited, ... (docs/operations.md).",
              may_be_empty=True),
        panel(l, "timeseries", "Active series by tenant",
              [target(f"sum by (tenant) (secumon_active_series{{{SELF}}})", "{{tenant}}")],
              description="Series with a sample in the last hour, against --ingest-max-series-per-tenant."),
        panel(l, "timeseries", "Requests refused by authentication",
              [target(by("reason", "secumon_auth_refused_total"), "{{reason}}")], unit="reqps",
              description="Empty while every request is authenticated (or authentication is off).", may_be_empty=True),
        # Queries
        panel(l, "timeseries", "Queries per second",
              [target(by("kind", "secumon_query_duration_seconds_count"), "{{kind}}")], unit="reqps"),
        panel(l, "timeseries", "Query latency",
              [target(f"histogram_quantile(0.5, {by('le', 'secumon_query_duration_seconds_bucket')})", "p50"),
               target(f"histogram_quantile(0.99, {by('le', 'secumon_query_duration_seconds_bucket')})", "p99")], unit="s"),
        panel(l, "timeseries", "Queries refused by limit",
              [target(by("reason", "secumon_queries_refused_total"), "{{reason}}")], unit="reqps",
              description="too_many_samples (--query-max-samples), too_many_series (--query-max-series), timeout (--query-timeout-secs)."),
        panel(l, "timeseries", "HTTP requests by handler and code",
              [target(f"topk(15, {by('handler, code', 'secumon_http_requests_total')})", "{{handler}} {{code}}")], unit="reqps"),
        # Storage
        panel(l, "timeseries", "Bytes on disk",
              [target(f"sum by (kind) (secumon_storage_disk_bytes{{{SELF}}})", "{{kind}}")], unit="bytes",
              description="Embedded engine: raw chunks in blocks, rollups, write-ahead log. Empty on PostgreSQL (ask the database).",
              may_be_empty=True),
        panel(l, "timeseries", "Blocks and samples in blocks",
              [target(f"sum(secumon_storage_blocks{{{SELF}}})", "blocks"),
               target(f"sum(secumon_storage_block_samples{{{SELF}}})", "samples")],
              description="Embedded engine: blocks fall as compaction merges them."),
        panel(l, "timeseries", "PostgreSQL lifecycle runs and failures",
              [target(f"sum(increase(secumon_storage_lifecycle_runs{{{SELF}}}[$__rate_interval]))", "runs"),
               target(f"sum(increase(secumon_storage_lifecycle_failures{{{SELF}}}[$__rate_interval]))", "failures")],
              description="Plain PostgreSQL lifecycle job (partitions, rollups, retention); flat at zero on the embedded engine and TimescaleDB."),
        panel(l, "timeseries", "Rollup lag",
              [target(f"time() - max by (relation) (secumon_rollup_watermark_seconds{{{SELF}}})", "{{relation}}")], unit="s",
              description="Plain PostgreSQL: how far behind now each rollup relation is materialized. Empty on other backends.",
              may_be_empty=True),
        panel(l, "stat", "Damaged bytes recovered", [target(f"sum(secumon_storage_damaged_bytes_recovered{{{SELF}}})")],
              unit="bytes", width=6, height=4, description="Non-zero after a torn write or a damaged block: the intact rest was recovered."),
        panel(l, "stat", "Query answers with warnings", [target(f"sum(increase(secumon_query_warnings_total{{{SELF}}}[$__range]))")],
              width=6, height=4),
        # Process
        panel(l, "timeseries", "CPU (cores busy)", [target(f"sum by (instance) ({rate('process_cpu_seconds_total', SELF)})", "{{instance}}")]),
        panel(l, "timeseries", "Memory", [target(f"sum by (instance) (process_resident_memory_bytes{{{SELF}}})", "{{instance}} resident")],
              unit="bytes"),
        panel(l, "timeseries", "Open files and threads",
              [target(f"sum by (instance) (process_open_fds{{{SELF}}})", "{{instance}} files"),
               target(f"sum by (instance) (process_threads{{{SELF}}})", "{{instance}} threads")]),
        panel(l, "timeseries", "Live-feed clients", [target(f"sum by (instance) (secumon_live_clients{{{SELF}}})", "{{instance}}")]),
    ]
    variables = [query_variable("instance", "Server", 'label_values(secumon_build_info{job="secumon"}, instance)')]
    return dashboard("secumon-itself", "SecuMon",
                     "The server itself, from the metrics it records into its own storage (--self-monitor-interval-secs).",
                     panels, variables, ["secumon"])


DASHBOARDS = {"host-overview.json": host_overview, "fleet-overview.json": fleet_overview,
              "secumon.json": secumon_itself}


def main():
    out = pathlib.Path(__file__).resolve().parent / "dashboards"
    check = "--check" in sys.argv[1:]
    stale = []
    for name, build in DASHBOARDS.items():
        text = json.dumps(build(), indent=2) + "\n"
        path = out / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"grafana/dashboards out of date: {', '.join(stale)}; run python3 grafana/generate.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
