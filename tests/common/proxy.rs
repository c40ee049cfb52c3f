//! A fault-injecting HTTP proxy between relocator and the S3 server, for tests: it
//! forwards requests unchanged (Host header included, so SigV4 signatures stay valid)
//! and, as the test's plan says, answers some of them itself with a fault instead.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Forward,
    /// 500 InternalError.
    Internal,
    /// 503 SlowDown, as S3 throttles.
    SlowDown,
    /// Close the connection without answering.
    Reset,
    /// Answer nothing for this long (past the client's timeout).
    Stall(Duration),
    /// Hold the request this long, then forward it: time for the test to change
    /// something on the server while the request is on its way.
    Delay(Duration),
    /// Forward, then close the connection without passing the answer on: the request
    /// was carried out, and the client never hears so.
    Lost,
    /// Forward, but turn a `200` into `200` with an `<Error>` body (CopyObject's trap).
    ErrorIn200,
    /// 412 PreconditionFailed, as a server answers a conditional request whose condition
    /// fails (`If-None-Match: *` onto an existing key, `x-amz-copy-source-if-match`).
    PreconditionFailed,
    /// 404 NoSuchKey: the server says the key is free (a HEAD that lies, to stage an
    /// object appearing between a look and a copy).
    NotFound,
    /// Forward, but flip the first byte of a `200`/`206` body: a server (or network) that
    /// returns wrong bytes.
    Corrupt,
}

/// A request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: hyper::HeaderMap,
}

/// Decides the fault for the n-th request (0-based) with this method and path.
pub type Plan = Box<dyn Fn(u64, &str, &str) -> Fault + Send + Sync>;

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    /// Faults served, by kind.
    pub faults: Arc<Mutex<Vec<Fault>>>,
    /// Every request, in order of arrival.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    plan: Arc<Mutex<Plan>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Start a proxy to `upstream` (e.g. http://127.0.0.1:39000) following `plan`.
    pub async fn start(upstream: &str, plan: Plan) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream: hyper::Uri = upstream.parse().expect("upstream URI");
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
        let requests = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let plan = Arc::new(Mutex::new(plan));
        let (r, f, p) = (requests.clone(), faults.clone(), plan.clone());
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (client, upstream, r, f, p, log) = (
                    client.clone(),
                    upstream.clone(),
                    r.clone(),
                    f.clone(),
                    p.clone(),
                    log.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (client, upstream, r, f, p) = (
                            client.clone(),
                            upstream.clone(),
                            r.clone(),
                            f.clone(),
                            p.clone(),
                        );
                        log.lock().expect("seen lock").push(Seen {
                            method: req.method().to_string(),
                            target: req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: req.headers().clone(),
                        });
                        async move { handle(req, client, upstream, r, f, p).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FaultProxy {
            addr,
            requests,
            faults,
            seen,
            plan,
            task,
        }
    }

    /// Wait until the requests seen so far satisfy `seen` (e.g. a copy has arrived, and
    /// is being held); panics with `what` after `within`.
    pub async fn wait_for(&self, what: &str, within: Duration, seen: impl Fn(&[Seen]) -> bool) {
        let start = std::time::Instant::now();
        while !seen(&self.seen.lock().expect("seen lock")) {
            assert!(start.elapsed() < within, "{what} never came");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change the plan (e.g. heal the network).
    pub fn set_plan(&self, plan: Plan) {
        *self.plan.lock().expect("plan lock") = plan;
    }

    pub fn faults_served(&self) -> usize {
        self.faults.lock().expect("faults lock").len()
    }

    /// A plan failing a random `share` of requests with a random fault (seeded).
    pub fn random(share: f64, seed: u64) -> Plan {
        let rng = Mutex::new(StdRng::seed_from_u64(seed));
        Box::new(move |_, method, _| {
            let mut rng = rng.lock().expect("rng lock");
            if !rng.random_bool(share) {
                return Fault::Forward;
            }
            match rng.random_range(0..5) {
                0 => Fault::Internal,
                1 => Fault::SlowDown,
                2 => Fault::Reset,
                3 => Fault::Stall(Duration::from_secs(3)),
                _ if method == "PUT" => Fault::ErrorIn200,
                _ => Fault::SlowDown,
            }
        })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The service's "error": makes hyper close the connection without a response.
#[derive(Debug)]
pub struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the fault proxy")
    }
}

impl std::error::Error for ResetConnection {}

fn full(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    r
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
const PRECONDITION_FAILED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>";
const NO_SUCH_KEY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>";
const INTERNAL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>";

async fn handle(
    req: Request<Incoming>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>,
    upstream: hyper::Uri,
    requests: Arc<AtomicU64>,
    faults: Arc<Mutex<Vec<Fault>>>,
    plan: Arc<Mutex<Plan>>,
) -> Result<Response<Body>, ResetConnection> {
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let fault = (plan.lock().expect("plan lock"))(n, req.method().as_str(), req.uri().path());
    if fault != Fault::Forward {
        faults.lock().expect("faults lock").push(fault);
    }
    match fault {
        Fault::Internal => return Ok(full(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL)),
        Fault::SlowDown => return Ok(full(StatusCode::SERVICE_UNAVAILABLE, SLOW_DOWN)),
        Fault::PreconditionFailed => {
            return Ok(full(StatusCode::PRECONDITION_FAILED, PRECONDITION_FAILED))
        }
        Fault::NotFound => return Ok(full(StatusCode::NOT_FOUND, NO_SUCH_KEY)),
        // hyper drops the connection, unanswered, when the service fails.
        Fault::Reset => return Err(ResetConnection),
        Fault::Stall(d) => {
            tokio::time::sleep(d).await;
            return Ok(full(StatusCode::SERVICE_UNAVAILABLE, SLOW_DOWN));
        }
        Fault::Delay(d) => tokio::time::sleep(d).await,
        Fault::Forward | Fault::ErrorIn200 | Fault::Corrupt | Fault::Lost => {}
    }
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    parts.uri = format!(
        "{}://{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream.authority().map(|a| a.as_str()).unwrap_or(""),
        pq
    )
    .parse()
    .expect("upstream URI");
    let resp = match client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(_) => return Ok(full(StatusCode::BAD_GATEWAY, INTERNAL)),
    };
    if fault == Fault::Lost {
        let _ = resp.into_body().collect().await;
        return Err(ResetConnection);
    }
    if fault == Fault::ErrorIn200 && resp.status() == StatusCode::OK {
        // The copy may well have happened; the answer says it failed, as S3 does when a
        // copy fails midway.
        return Ok(full(StatusCode::OK, INTERNAL));
    }
    if fault == Fault::Corrupt && matches!(resp.status().as_u16(), 200 | 206) {
        let (parts, body) = resp.into_parts();
        let Ok(body) = body.collect().await else {
            return Err(ResetConnection);
        };
        let mut bytes = body.to_bytes().to_vec();
        if let Some(b) = bytes.first_mut() {
            *b ^= 0xff;
        }
        let body = Full::new(Bytes::from(bytes))
            .map_err(|e| match e {})
            .boxed();
        return Ok(Response::from_parts(parts, body));
    }
    Ok(resp.map(|b| b.boxed()))
}
