//! Integration tests: the real server over HTTP, on a real PostgreSQL, against a real
//! Prometheus where one is the reference. One binary, so PostgreSQL starts once per run.

mod support;

mod agent;
mod agents;
mod api;
mod auth;
mod catalog;
mod compose;
mod conformance;
mod crash;
mod e2e_prometheus;
mod embedded;
mod grafana;
mod hardening;
mod lifecycle;
mod live;
mod nats;
mod opamp;
mod openapi;
mod otlp;
mod promql_diff;
mod readme;
mod remote_write;
mod rollup_queries;
mod rules;
mod timescaledb;
mod tls;
