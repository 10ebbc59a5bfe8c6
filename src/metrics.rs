//! Prometheus metrics: the text exposition format (version 0.0.4) and a tiny HTTP
//! endpoint that serves it (`GET /metrics`).
//!
//! The controller and the memory node already keep the counters worth exporting
//! (cluster status, data-plane statistics), so this module does not keep a registry of
//! its own: each scrape renders the current values through a caller-supplied closure
//! into an [`Exposition`]. The only state kept here is [`Histogram`], for latencies that
//! nothing else records.
//!
//! The endpoint answers one request per connection (`Connection: close`), reads at
//! most [`MAX_REQUEST_HEAD`] bytes of request head and gives a client
//! [`REQUEST_TIMEOUT`] to send it, so a slow or hostile scraper cannot hold it up.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Longest request head (request line and headers) the endpoint reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the current metrics as exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address could not be bound.
    #[error("cannot serve metrics on '{addr}': {source}; choose another --metrics address or port (port 0 picks a free one)")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The thread or runtime serving the endpoint could not be started.
    #[error("cannot start the metrics endpoint: {0}; check the process's thread and file limits")]
    Runtime(#[source] std::io::Error),
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Bucketed observations with a sum and a count.
    Histogram,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

/// Builds one exposition document. Families must be declared ([`Exposition::family`])
/// before their samples, each family once.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a metric family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// Writes one sample of `name` with `labels`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// Declares a family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: MetricType, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// Writes the samples of `h` (`_bucket`, `_sum`, `_count`) under `name` with
    /// `labels`; the family must be declared as a histogram.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let snap = h.snapshot();
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&snap.buckets) {
            cumulative += n;
            let le = format_float(*bound);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, snap.count as f64);
        self.sample(&format!("{name}_sum"), labels, snap.sum_secs);
        self.sample(&format!("{name}_count"), labels, snap.count as f64);
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn format_float(v: f64) -> String {
    let mut s = String::new();
    push_value(&mut s, v);
    s
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Default latency buckets in seconds: 10 µs to 5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// A latency histogram with fixed bucket bounds, updated with relaxed atomics (a scrape
/// may see an observation in its bucket but not yet in the count; Prometheus tolerates
/// that).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more for `+Inf`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per finite bucket (not cumulative).
    pub buckets: Vec<u64>,
    /// All observations.
    pub count: u64,
    /// Sum of the observations in seconds.
    pub sum_secs: f64,
}

impl Histogram {
    /// A histogram with upper bucket bounds `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets[..self.bounds.len()]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Serves `render`'s output at `GET /metrics` on `listener` until `shutdown` turns
/// true (or its sender is dropped). Runs on the caller's tokio runtime.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let render = render.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(sock, &render).await {
                            tracing::debug!(%peer, "metrics request failed: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting a metrics connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Resolves once `shutdown` says so (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&s| s).await;
}

/// Reads one request head and answers it.
async fn answer(mut sock: tokio::net::TcpStream, render: &Render) -> std::io::Result<()> {
    let mut head: Vec<u8> = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok::<bool, std::io::Error>(true);
            }
            if head.len() >= MAX_REQUEST_HEAD {
                return Ok(false);
            }
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let complete = match complete {
        Ok(r) => r?,
        Err(_) => false,
    };
    let (status, ctype, body) = if !complete {
        (
            "400 Bad Request",
            "text/plain",
            "incomplete or oversized request\n".to_string(),
        )
    } else {
        route(&head, render)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(response.as_bytes()).await?;
    sock.shutdown().await
}

/// Picks the answer to a complete request head.
fn route(head: &[u8], render: &Render) -> (&'static str, &'static str, String) {
    let line: &[u8] = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, render()),
        ("GET", "/") => (
            "200 OK",
            "text/plain",
            "farpool metrics: GET /metrics\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".to_string(),
        ),
    }
}

/// A metrics endpoint on a thread of its own (for processes without a tokio runtime,
/// such as the memory node). Stops when dropped.
#[derive(Debug)]
pub struct MetricsThread {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsThread {
    /// Binds `addr` and serves `render` from a new thread with a single-threaded
    /// runtime.
    pub fn start(addr: &str, render: Render) -> Result<MetricsThread, MetricsError> {
        let bind_err = |source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(MetricsError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_err)?
        };
        let (stop, rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("farpool-metrics".into())
            .spawn(move || runtime.block_on(serve(listener, render, rx)))
            .map_err(MetricsError::Runtime)?;
        Ok(MetricsThread {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsThread {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fetches `http://addr/metrics` with a plain HTTP/1.0 GET and returns the body (for
/// tests and the soak; no HTTP client dependency).
pub fn scrape(addr: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let sock_addr = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock_addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: farpool\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header end")
    })?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected answer: {}", head.lines().next().unwrap_or("")),
        ));
    }
    Ok(body.to_string())
}

/// The value of the first sample in `text` whose name and labels are exactly
/// `series` (e.g. `farpool_memnode_ops_total{op="read"}`).
pub fn sample_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_labels_and_histograms() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut e = Exposition::new();
        e.single("a_total", MetricType::Counter, "A.\nB", 3.0);
        e.family("b", MetricType::Gauge, "B.");
        e.sample("b", &[("k", "x\"y\\z")], 0.5);
        e.family("h_seconds", MetricType::Histogram, "H.");
        e.histogram("h_seconds", &[("kind", "alloc")], &h);
        let t = e.finish();
        assert!(t.contains("# HELP a_total A.\\nB\n# TYPE a_total counter\na_total 3\n"));
        assert!(t.contains("b{k=\"x\\\"y\\\\z\"} 0.5\n"));
        assert!(t.contains("h_seconds_bucket{kind=\"alloc\",le=\"0.001\"} 1\n"));
        assert!(t.contains("h_seconds_bucket{kind=\"alloc\",le=\"0.01\"} 2\n"));
        assert!(t.contains("h_seconds_bucket{kind=\"alloc\",le=\"+Inf\"} 3\n"));
        assert!(t.contains("h_seconds_count{kind=\"alloc\"} 3\n"));
        assert_eq!(sample_value(&t, "a_total"), Some(3.0));
        assert_eq!(sample_value(&t, "b{k=\"x\\\"y\\\\z\"}"), Some(0.5));
        let sum = sample_value(&t, "h_seconds_sum{kind=\"alloc\"}").unwrap();
        assert!((sum - 1.0055).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn endpoint_serves_metrics_and_refuses_the_rest() {
        let render: Render = Arc::new(|| "x_total 7\n".to_string());
        let m = MetricsThread::start("127.0.0.1:0", render).unwrap();
        let addr = m.local_addr().to_string();
        let body = scrape(&addr, Duration::from_secs(5)).unwrap();
        assert_eq!(sample_value(&body, "x_total"), Some(7.0));
        use std::io::{Read, Write};
        for (req, want) in [
            (&b"POST /metrics HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 405"),
            (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404"),
            (&[b'A'; MAX_REQUEST_HEAD][..], "HTTP/1.1 400"),
        ] {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let _ = s.write_all(req);
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            assert!(r.starts_with(want), "{r}");
        }
        drop(m);
        assert!(std::net::TcpStream::connect(&addr).is_err());
    }
}
