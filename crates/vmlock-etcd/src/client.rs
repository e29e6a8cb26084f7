//! [`Etcd`]: the etcd-client connection behind a blocking API. A current-thread tokio runtime runs
//! on a thread the client owns (it drives the I/O and timers and runs the keep-alive tasks); a
//! caller's thread runs its request with `Handle::block_on`, bounded by the request timeout.
//!
//! Failover is ours, not the gRPC balancer's: one etcd-client `Client` per member, every request
//! sent to the member in use, and a retryable failure moves everyone to the next member. (With
//! one channel balanced over all members, a killed member kept being picked for seconds — its
//! connection fails fast, so it always looks least loaded — long enough for a 3 s lease to pass
//! its fencing deadline.)

use crate::{Config, Error};
use etcd_client::{Client, ConnectOptions};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A connection to an etcd cluster; cheap to clone (clones share the runtime and connection).
#[derive(Clone)]
pub struct Etcd {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) handle: Handle,
    /// One client per member (by endpoint), connected on first use.
    members: Vec<Mutex<Option<Client>>>,
    /// The member requests go to; moved on by a retryable failure.
    current: AtomicUsize,
    options: ConnectOptions,
    pub(crate) config: Config,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.inner.config.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .field("host", &self.inner.config.host)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            // The runtime thread ends when its stop signal arrives; it never blocks otherwise.
            // The last clone may go on that thread itself (a keep-alive task ending after its
            // lease and connection were dropped): it must not join itself (that panicked with
            // EDEADLK); it ends on its own once this returns.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Whether an error may be retried on another member: transport failures and the gRPC codes a
/// dying or leaderless member answers with.
fn retryable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted
        ),
        _ => false,
    }
}

/// Whether etcd refused the client itself (authentication or permission): not retried, reported
/// as [`Error::Refused`].
fn refused(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    let etcd_client::Error::GRpcStatus(s) = e else {
        return false;
    };
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => true,
        // "authentication failed, invalid user ID or password", "user name is empty",
        // "authentication is not enabled", "user name not found".
        Code::InvalidArgument | Code::FailedPrecondition => {
            s.message().contains("authentication") || s.message().contains("user name")
        }
        _ => false,
    }
}

/// The pause between two tries of a request (another member may be picked).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

impl Etcd {
    /// Validates `config`, starts the runtime thread, connects, and checks that the cluster
    /// answers (a status request, retried on every member within `connect_timeout`): an
    /// unreachable cluster is [`Error::Unreachable`] naming the endpoints (a TLS handshake
    /// refused either way looks the same), a failed authentication [`Error::Refused`] at once.
    pub fn connect(config: &Config) -> Result<Etcd, Error> {
        config.validate()?;
        let options = connect_options(config)?;
        let (htx, hrx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vmlock-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = htx.send(Err(e));
                        return;
                    }
                };
                let _ = htx.send(Ok(rt.handle().clone()));
                // Drives I/O, timers and the keep-alive tasks until the client is dropped.
                let _ = rt.block_on(stop_rx);
            })
            .map_err(Error::Runtime)?;
        let handle = hrx
            .recv()
            .map_err(|_| Error::Runtime(std::io::Error::other("runtime thread died")))?
            .map_err(Error::Runtime)?;
        let etcd = Etcd {
            inner: Arc::new(Inner {
                handle,
                members: config.endpoints.iter().map(|_| Mutex::new(None)).collect(),
                current: AtomicUsize::new(0),
                options,
                config: config.clone(),
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
        };
        etcd.run("status", config.connect_timeout(), |mut c| async move {
            c.status().await
        })
        .map_err(|e| match e {
            Error::Request { reason, .. } => Error::Unreachable {
                endpoints: config.endpoints_text(),
                timeout: config.connect_timeout(),
                reason,
            },
            Error::Refused {
                endpoints, reason, ..
            } => Error::Refused {
                what: "connect",
                endpoints,
                reason,
            },
            other => other,
        })?;
        Ok(etcd)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Runs `op` on the calling thread, retrying retryable failures until `bound` has passed.
    /// `op` must be safe to repeat, or its caller must recognise its own earlier success.
    pub(crate) fn run<T, F, Fut>(
        &self,
        what: &'static str,
        bound: Duration,
        op: F,
    ) -> Result<T, Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + bound;
        let mut last: String;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(self.inner.config.attempt_timeout());
            let inner = &self.inner;
            let attempt = async {
                let (member, client) = inner.member().await?;
                Ok::<_, (usize, Result<etcd_client::Error, String>)>(
                    op(client).await.map_err(|e| (member, Ok(e))),
                )
            };
            let outcome = inner
                .handle
                .block_on(async { tokio::time::timeout(left, attempt).await });
            let timed_out = match outcome {
                Ok(Ok(Ok(v))) => return Ok(v),
                Ok(Ok(Err((member, Ok(e))))) | Ok(Err((member, Ok(e)))) if retryable(&e) => {
                    last = format!("{}: {e}", inner.endpoint(member));
                    inner.failed(member);
                    false
                }
                Ok(Ok(Err((_, Ok(e))))) | Ok(Err((_, Ok(e)))) if refused(&e) => {
                    return Err(Error::Refused {
                        what,
                        endpoints: self.inner.config.endpoints_text(),
                        reason: e.to_string(),
                    })
                }
                Ok(Ok(Err((_, Ok(e))))) | Ok(Err((_, Ok(e)))) => {
                    return Err(self.request_error(what, e.to_string(), false))
                }
                Ok(Ok(Err((member, Err(reason))))) | Ok(Err((member, Err(reason)))) => {
                    last = format!("{}: {reason}", inner.endpoint(member));
                    inner.failed(member);
                    false
                }
                Err(_) => {
                    let member = inner.current.load(Ordering::Acquire);
                    last = format!("{}: no answer in {left:?}", inner.endpoint(member));
                    inner.failed(member);
                    true
                }
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(self.request_error(what, last, timed_out));
            }
            tracing::debug!(what, error = %last, "etcd request failed; retrying");
            // A retry pause, bounded by the request's deadline checked above.
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    fn request_error(&self, what: &'static str, reason: String, timed_out: bool) -> Error {
        Error::Request {
            what,
            endpoints: self.inner.config.endpoints_text(),
            reason,
            timed_out,
        }
    }

    /// One transaction, bounded by the request timeout and retried like every request (each
    /// caller's transaction recognises its own earlier success, or is idempotent).
    pub(crate) fn txn(
        &self,
        what: &'static str,
        txn: etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse, Error> {
        self.run(what, self.config().request_timeout(), |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
    }

    /// Every key under `prefix`.
    pub(crate) fn get_prefix(&self, prefix: &str) -> Result<etcd_client::GetResponse, Error> {
        self.run("get", self.config().request_timeout(), |mut c| {
            let p = prefix.to_owned();
            async move {
                c.get(p, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
            }
        })
    }

    /// A bare put then delete of `key` (no transaction, no lease): the floor the lock
    /// operations are measured against.
    pub fn put_delete(&self, key: &str) -> Result<(), Error> {
        let t = self.inner.config.request_timeout();
        self.run("put", t, |mut c| async move {
            c.put(key, "x", None).await.map(drop)
        })?;
        self.run("delete", t, |mut c| async move {
            c.delete(key, None).await.map(drop)
        })
    }
}

impl Inner {
    /// The endpoint of member `i`.
    pub(crate) fn endpoint(&self, i: usize) -> &str {
        self.config
            .endpoints
            .get(i % self.config.endpoints.len().max(1))
            .map_or("", String::as_str)
    }

    /// The member in use and its client, connecting it if it has none yet; a member that
    /// cannot be connected is a failure of that member. (With a user, connecting authenticates:
    /// a wrong password is etcd's error, not retried.)
    pub(crate) async fn member(
        &self,
    ) -> Result<(usize, Client), (usize, Result<etcd_client::Error, String>)> {
        let n = self.members.len().max(1);
        let i = self.current.load(Ordering::Acquire) % n;
        let cached = self.members[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(c) = cached {
            return Ok((i, c));
        }
        let connected = tokio::time::timeout(
            self.config.connect_timeout(),
            Client::connect([self.endpoint(i).to_owned()], Some(self.options.clone())),
        )
        .await;
        match connected {
            Ok(Ok(c)) => {
                *self.members[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok((i, c))
            }
            Ok(Err(e)) => Err((i, Ok(e))),
            Err(_) => Err((i, Err("no connection in time".into()))),
        }
    }

    /// Member `i` failed: requests go to the next one (unless another caller moved on already).
    pub(crate) fn failed(&self, i: usize) {
        let n = self.members.len().max(1);
        let _ =
            self.current
                .compare_exchange(i % n, (i + 1) % n, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// etcd-client's options from the configuration: request and connect timeouts, a leader
/// required (a member cut off from the majority refuses at once instead of hanging), user and
/// password, TLS.
///
/// With a user, the token is refreshed when etcd says it expired. etcd forgets a token after
/// `--auth-token-ttl` (300 s) without use — and keep-alives do not use it — or when the member
/// restarts; without the refresh every later request failed with "invalid auth token" for good
/// (tests/secure.rs, `an_expired_auth_token_is_renewed`).
fn connect_options(config: &Config) -> Result<ConnectOptions, Error> {
    let mut o = ConnectOptions::new()
        .with_timeout(config.attempt_timeout())
        .with_connect_timeout(config.connect_timeout())
        .with_keep_alive(Duration::from_secs(1), config.request_timeout())
        .with_require_leader(true);
    if let (Some(u), Some(p)) = (&config.user, &config.password) {
        o = o.with_user(u, p).with_auto_token_refresh(true);
    }
    if config.ca_file.is_some() || config.cert_file.is_some() {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| Error::File {
                path: p.to_owned(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        o = o.with_tls(tls);
    }
    Ok(o)
}
