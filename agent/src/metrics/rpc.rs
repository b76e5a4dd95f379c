//! RPC counts and latencies: a tower layer on every gRPC router (unix socket, TCP, Host UI), so each call is
//! counted once by the listener it came in on, with its final status code.
//!
//! The code comes from the response headers when the call failed before any message (tonic sends those as a
//! trailers-only response), else from the trailers at the end of the body; a body dropped before its trailers (the
//! client went away mid-stream) counts as `Cancelled`. The latency is the time to the response headers: for a
//! unary call its whole handling, for a stream (WatchEvents, Console) its set-up, so an hour-long console session
//! does not drown the histogram.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tonic::codegen::http;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~12 s.
    Histogram::new(exponential_buckets(0.0005, 2.5, 12))
}

/// The RPC figures since the daemon started. Cheap to clone: clones count into the same families.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self { calls: Family::default(), latency: Family::new_with_constructor(latency_histogram) }
    }
}

impl RpcMetrics {
    /// Adds the families to a scrape's registry (one with the `qx` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("rpc_requests", "gRPC calls finished, by method and status code", self.calls.clone());
        registry.register_with_unit(
            "rpc_duration",
            "Time from a gRPC call's arrival to its response headers",
            Unit::Seconds,
            self.latency.clone(),
        );
    }

    pub fn layer(&self) -> RpcMetricsLayer {
        RpcMetricsLayer(self.clone())
    }

    fn finish(&self, method: &Arc<MethodLabels>, code: tonic::Code) {
        let labels =
            CallLabels { service: method.service.clone(), method: method.method.clone(), code: format!("{code:?}") };
        self.calls.get_or_create(&labels).inc();
    }
}

/// The service and method of a gRPC path (`/quantix.node.v1.NodeService/StartVm`).
fn method_of(path: &str) -> MethodLabels {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or(("", path));
    MethodLabels { service: service.to_owned(), method: method.to_owned() }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(RpcMetrics);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = Arc::new(method_of(request.uri().path()));
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            metrics.latency.get_or_create(&method).observe(started.elapsed().as_secs_f64());
            if let Some(code) = status_of(response.headers()) {
                metrics.finish(&method, code);
                return Ok(response);
            }
            Ok(response.map(|body| tonic::body::Body::new(Observed { inner: body, pending: Some((metrics, method)) })))
        })
    }
}

/// A response body that counts its call when the trailers pass, or when it is dropped without them.
struct Observed {
    inner: tonic::body::Body,
    pending: Option<(RpcMetrics, Arc<MethodLabels>)>,
}

impl Observed {
    fn finish(&mut self, code: tonic::Code) {
        if let Some((metrics, method)) = self.pending.take() {
            metrics.finish(&method, code);
        }
    }
}

impl Body for Observed {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().map(|t| status_of(t).unwrap_or(tonic::Code::Ok)) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(tonic::Code::Internal),
            Poll::Ready(None) => self.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        let labels = method_of("/quantix.node.v1.NodeService/StartVm");
        assert_eq!((labels.service.as_str(), labels.method.as_str()), ("quantix.node.v1.NodeService", "StartVm"));
        let labels = method_of("/nonsense");
        assert_eq!((labels.service.as_str(), labels.method.as_str()), ("", "nonsense"));
    }

    #[test]
    fn a_body_dropped_before_its_trailers_counts_as_cancelled() {
        let metrics = RpcMetrics::default();
        let method = Arc::new(method_of("/s.S/Watch"));
        drop(Observed { inner: tonic::body::Body::empty(), pending: Some((metrics.clone(), Arc::clone(&method))) });
        let labels = CallLabels { service: "s.S".into(), method: "Watch".into(), code: "Cancelled".into() };
        assert_eq!(metrics.calls.get_or_create(&labels).get(), 1);
    }
}
