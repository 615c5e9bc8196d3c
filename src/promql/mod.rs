//! The PromQL engine: parses with `promql-parser`, loads the series every selector needs through
//! the storage trait, then evaluates the expression over all steps at once.
//!
//! Evaluation is series-at-a-time: a selector produces, for each series, its points at every
//! step in one pass over that series' samples (two cursors, never a re-scan per step), and
//! range functions fold sliding windows the same way. Operators and aggregations then work on
//! whole step columns. The engine never knows which backend answered `select`.

mod aggregate;
mod binary;
mod eval;
mod functions;
pub mod limits;
mod plan;
mod rollups;
mod value;

pub use rollups::SourceResolution;
pub use value::QueryValue;

use crate::model::{Matcher, TenantId};
use crate::storage::{DynStorage, StorageError};
use crate::telemetry::Metrics;
use promql_parser::label::MatchOp as ParserMatchOp;
use promql_parser::parser::value::ValueType;
use promql_parser::parser::VectorSelector;
use promql_parser::parser::{self, Expr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Engine limits and defaults (`[query]` in the config file).
#[derive(Clone, Debug, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// How far back an instant selector looks for the latest sample, in seconds
    /// (Prometheus's `--query.lookback-delta`).
    #[arg(
        id = "query.lookback_delta_secs",
        long = "query-lookback-delta-secs",
        env = "SECUMON_QUERY_LOOKBACK_DELTA_SECS",
        default_value_t = 300
    )]
    pub lookback_delta_secs: u64,
    /// Longest a query may run, in seconds (Prometheus's `--query.timeout`).
    #[arg(
        id = "query.timeout_secs",
        long = "query-timeout-secs",
        env = "SECUMON_QUERY_TIMEOUT_SECS",
        default_value_t = 120
    )]
    pub timeout_secs: u64,
    /// Most samples a single query may load or produce (Prometheus's `--query.max-samples`).
    #[arg(
        id = "query.max_samples",
        long = "query-max-samples",
        env = "SECUMON_QUERY_MAX_SAMPLES",
        default_value_t = 50_000_000
    )]
    pub max_samples: usize,
    /// Step of a subquery that names none, in seconds (Prometheus uses its global
    /// `evaluation_interval`).
    #[arg(
        id = "query.default_subquery_step_secs",
        long = "query-default-subquery-step-secs",
        env = "SECUMON_QUERY_DEFAULT_SUBQUERY_STEP_SECS",
        default_value_t = 60
    )]
    pub default_subquery_step_secs: u64,
    /// Queries evaluated at once; more wait in line, within their timeout (Prometheus's
    /// `--query.max-concurrency`).
    #[arg(
        id = "query.max_concurrency",
        long = "query-max-concurrency",
        env = "SECUMON_QUERY_MAX_CONCURRENCY",
        default_value_t = 20
    )]
    pub max_concurrency: usize,
    /// The coarsest rollups `sum_over_time` and `avg_over_time` may read when a query does
    /// not pass `max_source_resolution` (answers may then differ from raw in the last bits):
    /// `raw`, `5m`, `1h` or `auto`. Exact functions read rollups regardless.
    #[arg(
        id = "query.max_source_resolution",
        long = "query-max-source-resolution",
        env = "SECUMON_QUERY_MAX_SOURCE_RESOLUTION",
        value_enum,
        default_value_t = SourceResolution::Raw
    )]
    pub max_source_resolution: SourceResolution,
    /// Longest query text accepted, in bytes (VictoriaMetrics's `-search.maxQueryLen` is
    /// 16 KiB).
    #[arg(
        id = "query.max_length_bytes",
        long = "query-max-length-bytes",
        env = "SECUMON_QUERY_MAX_LENGTH_BYTES",
        default_value_t = 64 * 1024
    )]
    pub max_length_bytes: usize,
    /// Deepest nesting of a query expression (parentheses, operators, function calls,
    /// subqueries), estimated from the text before parsing; bounds the stack every
    /// recursive pass over the expression uses. At most 1000 takes effect.
    #[arg(
        id = "query.max_depth",
        long = "query-max-depth",
        env = "SECUMON_QUERY_MAX_DEPTH",
        default_value_t = 200
    )]
    pub max_depth: usize,
    /// Most series (or label names, or label values) one metadata request (`/api/v1/series`,
    /// `labels`, `label/<name>/values`, `status/tsdb`, `query_exemplars`) may answer; past it
    /// the request fails with 422.
    #[arg(
        id = "query.max_series",
        long = "query-max-series",
        env = "SECUMON_QUERY_MAX_SERIES",
        default_value_t = 500_000
    )]
    pub max_series: usize,
    /// Let rollups answer queries (false: raw samples for everything).
    #[arg(
        id = "query.rollups",
        long = "query-rollups",
        env = "SECUMON_QUERY_ROLLUPS",
        action = clap::ArgAction::Set,
        default_value_t = true
    )]
    pub rollups: bool,
    /// Threads that evaluate the large parts of queries (selectors, range functions and
    /// aggregations over many series and steps) side by side, one pool for the process; 0:
    /// one per core. At most 1,024.
    #[arg(
        id = "query.threads",
        long = "query-threads",
        env = "SECUMON_QUERY_THREADS",
        default_value_t = 0,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024)
    )]
    pub threads: usize,
    /// Points (series x steps) a part of a query must span before it is split over the query
    /// threads; smaller parts run on one thread, where splitting would cost more than it
    /// saves. 0 splits every part.
    #[arg(
        id = "query.parallel_min_points",
        long = "query-parallel-min-points",
        env = "SECUMON_QUERY_PARALLEL_MIN_POINTS",
        default_value_t = 100_000
    )]
    pub parallel_min_points: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// Why a query failed, in the categories of Prometheus's API (`errorType`).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query text or its parameters are wrong (`bad_data`).
    #[error("{0}")]
    BadData(String),
    /// The query is valid but cannot be evaluated (`execution`).
    #[error("{0}")]
    Execution(String),
    #[error("query processing would load too many samples into memory in query execution")]
    TooManySamples,
    #[error("the request selects more than {0} series, label names or values (--query-max-series): narrow its matchers or time range")]
    TooManySeries(usize),
    #[error("query timed out in {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for QueryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::TooManySamples => QueryError::TooManySamples,
            other => QueryError::Storage(other),
        }
    }
}

/// The times a query is evaluated at: `start`, `start + step`, ... up to `end` inclusive
/// (an instant query is one step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalRange {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl EvalRange {
    pub fn instant(t: i64) -> EvalRange {
        EvalRange {
            start: t,
            end: t,
            step: 1,
        }
    }

    /// How many steps the range has: none when `end < start` (a subquery whose aligned first
    /// step falls after its end), and never more than `usize::MAX` whatever the times (the
    /// arithmetic is done in 128 bits, so no range wraps around into a small count).
    pub fn steps(&self) -> usize {
        if self.end < self.start || self.step <= 0 {
            return 0;
        }
        let span = i128::from(self.end) - i128::from(self.start);
        usize::try_from(span / i128::from(self.step) + 1).unwrap_or(usize::MAX)
    }

    pub fn timestamps(&self) -> impl Iterator<Item = i64> + '_ {
        // Every step lies in [start, end], so the products cannot overflow.
        (0..self.steps()).map(move |i| self.start + i as i64 * self.step)
    }
}

/// Settings of one query request.
#[derive(Clone, Debug, Default)]
pub struct QueryOptions {
    /// The `timeout` parameter; the configured timeout bounds it.
    pub timeout: Option<Duration>,
    /// The `max_source_resolution` parameter; the configured default when absent.
    pub max_source_resolution: Option<SourceResolution>,
    /// Where the answer's warnings gather (damaged data storage skipped); the caller reads
    /// them after the query.
    pub warnings: crate::storage::Warnings,
}

#[derive(Clone)]
pub struct Engine {
    storage: DynStorage,
    config: EngineConfig,
    /// Bounds concurrent evaluations so queries cannot take every core from ingest.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Counts reads of rollups (`secumon_query_rollup_selects_total`).
    metrics: Arc<Metrics>,
    /// The query threads (`--query-threads`), shared by every evaluation.
    parallel: Option<eval::Parallel>,
}

/// The model's matchers for a parsed selector, its metric name included.
pub fn selector_matchers(vs: &VectorSelector) -> Vec<Matcher> {
    vs.matchers
        .matchers
        .iter()
        .map(|m| {
            let op = match &m.op {
                ParserMatchOp::Equal => crate::model::MatchOp::Equal(m.value.clone()),
                ParserMatchOp::NotEqual => crate::model::MatchOp::NotEqual(m.value.clone()),
                ParserMatchOp::Re(re) => crate::model::MatchOp::Regex(re.clone()),
                ParserMatchOp::NotRe(re) => crate::model::MatchOp::NotRegex(re.clone()),
            };
            Matcher {
                name: m.name.clone(),
                op,
            }
        })
        .chain(
            vs.name
                .as_ref()
                .filter(|_| {
                    !vs.matchers
                        .matchers
                        .iter()
                        .any(|m| m.name == crate::model::METRIC_NAME_LABEL)
                })
                .map(|name| Matcher::equal(crate::model::METRIC_NAME_LABEL, name.clone())),
        )
        .collect()
}

/// Parses a query as Prometheus 2.42's parser would: `holt_winters` is known (promql-parser
/// follows Prometheus 3, which renamed it), and functions or aggregations that 2.42 does not
/// have are refused as unknown.
pub fn parse(query: &str) -> Result<Expr, QueryError> {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        let holt_winters = parser::Function::new(
            "holt_winters",
            vec![ValueType::Matrix, ValueType::Scalar, ValueType::Scalar],
            0,
            ValueType::Vector,
            false,
        );
        // Fails only if the parser gains a built-in of that name, which then serves as well.
        let _ = parser::register_extra_functions(vec![holt_winters]);
    });
    let expr = parse_text(query).map_err(QueryError::BadData)?;
    check_known(&expr)?;
    Ok(expr)
}

/// The parser's answer, with a panic in it (a duration too large for `Duration`, found by
/// fuzzing: `up[5666…6]`) turned into the parse error it should have been.
fn parse_text(text: &str) -> Result<Expr, String> {
    std::panic::catch_unwind(|| parser::parse(text)).unwrap_or_else(|_| {
        Err(format!(
            "cannot parse {:?}: a number or duration out of range",
            text.chars().take(64).collect::<String>()
        ))
    })
}

/// Refuses what Prometheus 2.42 does not know.
fn check_known(expr: &Expr) -> Result<(), QueryError> {
    match expr {
        Expr::Call(call) => {
            if !functions::is_known(call.func.name) {
                return Err(QueryError::BadData(format!(
                    "unknown function with name {:?}",
                    call.func.name
                )));
            }
            call.args.args.iter().try_for_each(|a| check_known(a))
        }
        Expr::Aggregate(agg) => {
            let op = agg.op.to_string();
            if !aggregate::is_known(&op) {
                return Err(QueryError::BadData(format!("unknown aggregation {op:?}")));
            }
            check_known(&agg.expr)?;
            agg.param.as_deref().map_or(Ok(()), check_known)
        }
        Expr::Binary(b) => {
            check_known(&b.lhs)?;
            check_known(&b.rhs)
        }
        Expr::Paren(p) => check_known(&p.expr),
        Expr::Unary(u) => check_known(&u.expr),
        Expr::Subquery(s) => check_known(&s.expr),
        Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::VectorSelector(_)
        | Expr::MatrixSelector(_)
        | Expr::Extension(_) => Ok(()),
    }
}

/// Prometheus's documented name of a value type, for error messages.
fn documented_type(t: ValueType) -> &'static str {
    match t {
        ValueType::Vector => "instant vector",
        ValueType::Matrix => "range vector",
        ValueType::Scalar => "scalar",
        ValueType::String => "string",
    }
}

impl Engine {
    pub fn new(storage: DynStorage, config: EngineConfig, metrics: Arc<Metrics>) -> Engine {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(config.max_concurrency.max(1)));
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // One pool of query threads for the process: evaluation and the storage's reads
        // split their large parts over it. Built by the first engine; later ones (tests start
        // several servers in one process) share it.
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("secumon-query-{i}"))
            .build_global();
        if let Err(e) = built {
            tracing::debug!(error = %e, "query threads already started");
        }
        let parallel = Some(eval::Parallel {
            pool: None,
            min_points: config.parallel_min_points,
        });
        Engine {
            storage,
            config,
            slots,
            metrics,
            parallel,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The configured nesting limit, never above what the threads' stacks are proven to hold.
    fn max_depth(&self) -> usize {
        self.config.max_depth.min(limits::MAX_DEPTH_CEILING)
    }

    /// Runs a metadata read (series, label names and values, metric metadata, exemplars, TSDB
    /// status) under the limits of queries: it waits for one of the evaluation slots, ends at
    /// the timeout (the request's `timeout` if shorter), and fails when it answers more than
    /// `--query-max-series` items.
    pub async fn limited<T: Items>(
        &self,
        timeout: Option<Duration>,
        work: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, QueryError> {
        let result = async {
            let (_slot, deadline) = self.slot(timeout).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let items = tokio::time::timeout(remaining, work)
                .await
                .map_err(|_| QueryError::Timeout("metadata read"))??;
            if items.count() > self.config.max_series {
                return Err(QueryError::TooManySeries(self.config.max_series));
            }
            Ok(items)
        }
        .await;
        self.counted(result)
    }

    /// `result`, with a refusal by a limit counted in `/metrics`.
    fn counted<T>(&self, result: Result<T, QueryError>) -> Result<T, QueryError> {
        if let Err(e) = &result {
            self.metrics.query_refused(e);
        }
        result
    }

    /// One of the evaluation slots, waited for within the query's timeout (the request's if
    /// shorter than the configured one), and the query's deadline.
    async fn slot(
        &self,
        requested: Option<Duration>,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, Instant), QueryError> {
        let configured = Duration::from_secs(self.config.timeout_secs);
        let timeout = requested.map_or(configured, |t| t.min(configured));
        let deadline = Instant::now() + timeout;
        let slot = tokio::time::timeout(timeout, self.slots.acquire())
            .await
            .map_err(|_| QueryError::Timeout("query queue"))?
            .map_err(|_| QueryError::Execution("query engine is shutting down".into()))?;
        Ok((slot, deadline))
    }

    /// Parses a query within the configured length and nesting limits (checked on the text,
    /// before the parser recurses).
    pub fn parse(&self, query: &str) -> Result<Expr, QueryError> {
        limits::check_text(query, self.config.max_length_bytes, self.max_depth())?;
        parse(query)
    }

    /// Parses a series selector (`match[]` of the metadata endpoints) within the same limits.
    pub fn parse_selector(&self, text: &str) -> Result<Vec<Matcher>, String> {
        match self.parse(text).map_err(|e| e.to_string())? {
            Expr::VectorSelector(vs) => Ok(selector_matchers(&vs)),
            _ => Err(format!(
                "invalid series selector {text:?}: not a vector selector"
            )),
        }
    }

    /// Evaluates `expr` at time `t` (ms).
    pub async fn instant_query(
        &self,
        tenant: &TenantId,
        expr: Expr,
        t: i64,
        options: QueryOptions,
    ) -> Result<QueryValue, QueryError> {
        let result = self
            .exec(tenant, expr, EvalRange::instant(t), true, options)
            .await;
        self.counted(result)
    }

    /// Evaluates `expr` at every step of the range; the expression must yield a scalar or an
    /// instant vector, as in Prometheus.
    pub async fn range_query(
        &self,
        tenant: &TenantId,
        expr: Expr,
        range: EvalRange,
        options: QueryOptions,
    ) -> Result<QueryValue, QueryError> {
        let value_type = expr.value_type();
        if !matches!(value_type, ValueType::Vector | ValueType::Scalar) {
            return Err(QueryError::BadData(format!(
                "invalid expression type {:?} for range query, must be Scalar or instant Vector",
                documented_type(value_type)
            )));
        }
        let result = self.exec(tenant, expr, range, false, options).await;
        self.counted(result)
    }

    async fn exec(
        &self,
        tenant: &TenantId,
        expr: Expr,
        range: EvalRange,
        instant: bool,
        request: QueryOptions,
    ) -> Result<QueryValue, QueryError> {
        let (_slot, deadline) = self.slot(request.timeout).await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let options = eval::EvalOptions {
            lookback: self.config.lookback_delta_secs as i64 * 1000,
            max_samples: self.config.max_samples,
            default_subquery_step: (self.config.default_subquery_step_secs as i64 * 1000).max(1),
            max_source_resolution: request
                .max_source_resolution
                .unwrap_or(self.config.max_source_resolution),
            rollups: self.config.rollups,
        };
        // Loaded series are keyed by node address: box the AST so moving it into the blocking
        // task below does not move its nodes.
        let expr = Box::new(expr);
        let data = tokio::time::timeout(
            remaining,
            plan::fetch(
                &self.storage,
                tenant,
                &expr,
                range,
                &options,
                &self.metrics,
                &request.warnings,
            ),
        )
        .await
        .map_err(|_| QueryError::Timeout("query execution"))??;
        let loaded = Instant::now();
        let parallel = self.parallel.clone();
        tokio::task::spawn_blocking(move || {
            let mut evaluator = eval::Evaluator::new(range, options, deadline, data.raw)
                .with_rollups(data.rollups)
                .with_parallel(parallel);
            let value = evaluator.eval(&expr)?;
            tracing::debug!(eval_ms = loaded.elapsed().as_secs_f64() * 1e3, "evaluated");
            Ok(value::finish(value, range, instant))
        })
        .await
        // A panic in evaluation is a bug: its text goes to the log, not to the client.
        .map_err(|e| {
            QueryError::Storage(StorageError::Internal(format!(
                "query evaluation failed: {e}"
            )))
        })?
    }
}
/// What a metadata read answers (series, names, values), counted against `max_series`.
pub trait Items {
    fn count(&self) -> usize;
}

impl<T> Items for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }
}

impl Items for crate::storage::StringList {
    fn count(&self) -> usize {
        self.len()
    }
}
