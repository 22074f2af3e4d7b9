//! `--otlp-endpoint` exports traces and metrics: an in-repo OTLP/gRPC receiver (the
//! opentelemetry-proto tonic services) on port 0 collects what a `moetrain worker` sends while
//! it retries an unreachable coordinator; after SIGTERM the worker flushes on exit and the
//! receiver holds its `worker` and `session` spans and its `worker_session_failures` counter,
//! tagged `service.name = moetrain-worker`. Without the flag nothing is sent (checked by the
//! receiver staying empty).

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// What the receiver collected.
#[derive(Default)]
struct Seen {
    spans: BTreeSet<String>,
    services: BTreeSet<String>,
    metrics: BTreeSet<String>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Seen>>);

fn service_names(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    attrs
        .iter()
        .filter(|kv| kv.key == "service.name")
        .filter_map(
            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            },
        )
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            if let Some(r) = &rs.resource {
                seen.services.extend(service_names(&r.attributes));
            }
            for ss in rs.scope_spans {
                seen.spans.extend(ss.spans.into_iter().map(|s| s.name));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut seen = self.0.lock().unwrap();
        for rm in req.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                seen.metrics.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free port; returns its URL.
async fn start_receiver(rx: Receiver) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(rx.clone()))
            .add_service(MetricsServiceServer::new(rx))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Runs a worker against a dead coordinator for a moment, then SIGTERMs it; returns its exit code.
async fn run_worker_briefly(otlp: Option<&str>) -> Option<i32> {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_moetrain"));
    cmd.args([
        "worker",
        "--node",
        "otlp-node",
        "--coordinator",
        &dead,
        "--max-backoff",
        "200ms",
    ])
    .env_remove("MOETRAIN_OTLP_ENDPOINT")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true);
    if let Some(ep) = otlp {
        cmd.args(["--otlp-endpoint", ep]);
    }
    let mut child = cmd.spawn().expect("spawning moetrain worker");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = child.id().expect("worker exited early").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("worker did not exit within 15s of SIGTERM")
        .unwrap();
    status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exports_spans_and_metrics_only_when_asked() {
    let rx = Receiver::default();
    let url = start_receiver(rx.clone()).await;

    assert_eq!(run_worker_briefly(None).await, Some(0));
    {
        let seen = rx.0.lock().unwrap();
        assert!(
            seen.spans.is_empty() && seen.metrics.is_empty(),
            "exported without --otlp-endpoint"
        );
    }

    assert_eq!(run_worker_briefly(Some(&url)).await, Some(0));
    let seen = rx.0.lock().unwrap();
    assert!(
        seen.services.contains("moetrain-worker"),
        "services: {:?}",
        seen.services
    );
    for span in ["worker", "session"] {
        assert!(
            seen.spans.contains(span),
            "span {span} missing; got {:?}",
            seen.spans
        );
    }
    assert!(
        seen.metrics.contains("worker_session_failures"),
        "metrics: {:?}",
        seen.metrics
    );
}
