//! Process-wide telemetry for every `moetrain` subcommand: a `tracing` fmt layer on stderr
//! filtered by `RUST_LOG` (else a per-command default), and, only when `--otlp-endpoint` is given, traces and
//! metrics exported over OTLP/gRPC through `tracing-opentelemetry` and `opentelemetry-otlp`.
//!
//! Invariants: without an endpoint nothing is exported and no exporter is built; logs go to
//! stderr so that stdout stays machine-readable (`--output json`); [`Telemetry::shutdown`]
//! flushes both providers before the process exits. Call [`init`] from inside a multi-thread
//! tokio runtime: the tonic exporters run on it, and a current-thread runtime loses data at
//! shutdown (deps.md §3).

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal as _;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How long one OTLP export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often metrics are pushed to the collector.
const METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// Telemetry flags shared by the long-running subcommands (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector endpoint (e.g. http://127.0.0.1:4317). Without it nothing is exported.
    #[arg(long, env = "MOETRAIN_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// Owns the exporters; dropping it without [`Telemetry::shutdown`] may lose the last batch.
#[must_use = "call shutdown() before exiting so the last spans and metrics are flushed"]
pub struct Telemetry {
    /// Present only with `--otlp-endpoint`: the batch span exporter feeding the OTel layer.
    tracer_provider: Option<SdkTracerProvider>,
    /// Present only with `--otlp-endpoint`: the periodic metric exporter feeding `MetricsLayer`.
    meter_provider: Option<SdkMeterProvider>,
}

/// Installs the global subscriber. `service` names this process in exported resources
/// (`moetrain-worker`, `moetrain-coordinator`, ...); `default_filter` applies when `RUST_LOG` is
/// unset (`info` for daemons, `warn` for client commands).
pub fn init(
    service: &str,
    default_filter: &str,
    args: &TelemetryArgs,
) -> anyhow::Result<Telemetry> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => {
            EnvFilter::try_new(&spec).with_context(|| format!("invalid RUST_LOG `{spec}`"))?
        }
        Err(_) => EnvFilter::try_new(default_filter).context("invalid default log filter")?,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    let Some(endpoint) = args.otlp_endpoint.as_deref() else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
            .context("installing the tracing subscriber")?;
        return Ok(Telemetry {
            tracer_provider: None,
            meter_provider: None,
        });
    };

    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let span_exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .with_context(|| format!("building the OTLP span exporter for {endpoint}"))?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(span_exporter)
        .with_resource(resource.clone())
        .build();
    let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .with_context(|| format!("building the OTLP metric exporter for {endpoint}"))?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metric_exporter)
        .with_interval(METRICS_INTERVAL)
        .build();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    let tracer = tracer_provider.tracer("moetrain");
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(tracing_opentelemetry::MetricsLayer::new(
            meter_provider.clone(),
        ))
        .try_init()
        .context("installing the tracing subscriber")?;
    tracing::info!(endpoint, service, "exporting traces and metrics over OTLP");
    Ok(Telemetry {
        tracer_provider: Some(tracer_provider),
        meter_provider: Some(meter_provider),
    })
}

impl Telemetry {
    /// Flushes and stops the exporters. Export failures are logged, never fatal: telemetry must not
    /// change a command's exit code. The blocking flush runs on a blocking thread so the runtime's
    /// workers stay free to drive the tonic exporters.
    pub async fn shutdown(self) {
        let Telemetry {
            tracer_provider,
            meter_provider,
        } = self;
        if tracer_provider.is_none() && meter_provider.is_none() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            if let Some(tp) = tracer_provider {
                if let Err(e) = tp.force_flush() {
                    errors.push(format!("flushing spans: {e}"));
                }
                if let Err(e) = tp.shutdown() {
                    errors.push(format!("shutting down the span exporter: {e}"));
                }
            }
            if let Some(mp) = meter_provider {
                if let Err(e) = mp.force_flush() {
                    errors.push(format!("flushing metrics: {e}"));
                }
                if let Err(e) = mp.shutdown() {
                    errors.push(format!("shutting down the metric exporter: {e}"));
                }
            }
            errors
        })
        .await;
        match joined {
            Ok(errors) => {
                for e in errors {
                    eprintln!("warning: telemetry {e}");
                }
            }
            Err(e) => eprintln!("warning: telemetry shutdown task failed: {e}"),
        }
    }
}
