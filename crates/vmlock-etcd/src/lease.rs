//! [`HostLease`]: the host's etcd lease, its keep-alive task and its fencing deadline.
//!
//! The timing rule (docs/etcd.md; peers-and-fencing §4.1): with t_s the `CLOCK_BOOTTIME` time at
//! which the last successful grant or keep-alive was **sent**, TTL the TTL the server returned,
//! ρ = [`crate::CLOCK_RATE_BOUND`] and ε the configured margin, the deadline is
//! D = t_s + TTL·(1 − ρ) − ε. The leader cannot expire the lease before it received that
//! request (≥ t_s) plus TTL on its clock, and a new leader only extends leases; so before D
//! (on our clock) no other host can have taken a key of this lease.

use crate::{config::CLOCK_RATE_BOUND, Error, Etcd, LeaseId};
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// A point on `CLOCK_BOOTTIME` (monotonic, and it keeps counting across suspend, as the lease
/// does on the cluster), as the time since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootTime(pub Duration);

impl BootTime {
    /// Now.
    pub fn now() -> BootTime {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        BootTime(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }

    /// How long from now until `self` (zero if passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_sub(BootTime::now().0)
    }

    /// `self + d`.
    pub fn after(self, d: Duration) -> BootTime {
        BootTime(self.0 + d)
    }
}

/// Why a lease is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// No keep-alive succeeded before the fencing deadline: the cluster may expire the lease
    /// from then on (by the timing rule).
    DeadlinePassed,
    /// The cluster answered that the lease does not exist (expired or revoked).
    Expired,
    /// This host revoked it ([`HostLease::revoke`]).
    Revoked,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::DeadlinePassed => "no keep-alive succeeded before the fencing deadline",
            LossReason::Expired => "the cluster no longer knows it (expired or revoked)",
            LossReason::Revoked => "revoked by this host",
        })
    }
}

/// The lease as the keep-alive task last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// The TTL the server granted or last returned.
    pub ttl: Duration,
    /// t_s: when the last successful grant/keep-alive was sent.
    pub renewed_at: BootTime,
    /// D = t_s + TTL·(1 − ρ) − ε: every guest using this lease's keys must be stopped (reaped)
    /// by then unless a later keep-alive succeeds.
    pub deadline: BootTime,
    /// How many keep-alives succeeded.
    pub renewals: u64,
    /// Set once lost; never cleared (a lost lease is replaced by a new grant, not revived).
    pub lost: Option<LossReason>,
}

pub(crate) struct Shared {
    state: Mutex<LeaseState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        // A panic elsewhere while holding this lock leaves plain data: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lose(&self, reason: LossReason) {
        let mut s = self.lock();
        if s.lost.is_none() {
            s.lost = Some(reason);
            tracing::warn!(%reason, "etcd host lease lost");
        }
        self.changed.notify_all();
    }
}

/// The host's etcd lease. Every lock this host takes is attached to it; its keep-alive runs as a
/// task on the client's runtime thread, renewing every K and recording each success's send time.
///
/// Dropping it stops the keep-alives but revokes nothing: its keys stay until the cluster
/// expires the lease (a lock is released only on request). [`HostLease::revoke`] releases all.
pub struct HostLease {
    pub(crate) etcd: Etcd,
    id: LeaseId,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for HostLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLease")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

/// D for a success sent at `sent` with granted `ttl`.
fn deadline(sent: BootTime, ttl: Duration, margin: Duration) -> BootTime {
    BootTime(
        (sent.0 + ttl.mul_f64(1.0 - CLOCK_RATE_BOUND))
            .checked_sub(margin)
            .unwrap_or(sent.0),
    )
}

impl HostLease {
    /// Grants a lease of the configured TTL and starts keeping it alive. A grant is not
    /// retried on another member (a lost reply would leave an orphan lease, harmless: it expires
    /// with no key attached); the error names the endpoints.
    pub fn grant(etcd: &Etcd) -> Result<HostLease, Error> {
        let config = etcd.config().clone();
        let ttl = i64::try_from(config.ttl).unwrap_or(i64::MAX);
        let sent = BootTime::now();
        let resp = etcd.run(
            "lease grant",
            config.request_timeout(),
            |mut c| async move { c.lease_grant(ttl, None).await },
        )?;
        let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        let lease = Self::keep(etcd, LeaseId(resp.id()), sent, granted);
        tracing::info!(lease = %lease.id, ttl = ?granted, "etcd host lease granted");
        Ok(lease)
    }

    /// Takes over lease `id`, granted by an earlier run of this host's daemon, with one
    /// keep-alive: its keys stay attached and the deadline starts from that keep-alive's send
    /// time. A lease the cluster has already expired is [`Error::LeaseLost`] (`Expired`): every
    /// key it had is gone.
    pub fn adopt(etcd: &Etcd, id: LeaseId) -> Result<HostLease, Error> {
        let config = etcd.config().clone();
        let sent = BootTime::now();
        let ttl = etcd.run(
            "lease keep-alive",
            config.request_timeout(),
            |mut c| async move {
                // etcd-client's stream set-up sends one keep-alive and reports a lease the cluster
                // does not know as this error; a second one returns the TTL. D counts from the
                // first send (`sent`), the earlier and so the safer of the two.
                let (mut keeper, mut responses) = match c.lease_keep_alive(id.0).await {
                    Ok(s) => s,
                    Err(etcd_client::Error::LeaseKeepAliveError(e)) if e.contains("not found") => {
                        return Ok(0)
                    }
                    Err(e) => return Err(e),
                };
                keeper.keep_alive().await?;
                match responses.message().await {
                    Ok(Some(r)) => Ok(r.ttl()),
                    Ok(None) => Ok(0),
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                }
            },
        )?;
        if ttl <= 0 {
            return Err(Error::LeaseLost {
                lease: id,
                reason: LossReason::Expired,
            });
        }
        let granted = Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
        let lease = Self::keep(etcd, id, sent, granted);
        tracing::info!(lease = %id, ttl = ?granted, "etcd host lease taken over");
        Ok(lease)
    }

    /// Starts keeping `id` alive, its last success sent at `sent` with TTL `granted`.
    fn keep(etcd: &Etcd, id: LeaseId, sent: BootTime, granted: Duration) -> HostLease {
        let config = etcd.config();
        let shared = Arc::new(Shared {
            state: Mutex::new(LeaseState {
                ttl: granted,
                renewed_at: sent,
                deadline: deadline(sent, granted, config.margin()),
                renewals: 0,
                lost: None,
            }),
            changed: Condvar::new(),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = KeepAlive {
            inner: Arc::clone(&etcd.inner),
            id,
            shared: shared.clone(),
            interval: config.keepalive_interval(),
            margin: config.margin(),
            attempt_timeout: config.attempt_timeout(),
        };
        etcd.inner.handle.spawn(task.run(stop_rx));
        HostLease {
            etcd: etcd.clone(),
            id,
            shared,
            stop: Some(stop_tx),
        }
    }

    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// The client this lease belongs to.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The lease as last seen.
    pub fn state(&self) -> LeaseState {
        *self.shared.lock()
    }

    /// The fencing deadline D now in force. This, not [`HostLease::wait_lost`], is what a
    /// fencing enforcer must act on: it holds even if this process stops running.
    pub fn deadline(&self) -> BootTime {
        self.shared.lock().deadline
    }

    /// Fails with [`Error::LeaseLost`] if the lease is lost or its deadline has passed.
    pub fn check(&self) -> Result<(), Error> {
        let s = self.state();
        let lost = s
            .lost
            .or((BootTime::now() >= s.deadline).then_some(LossReason::DeadlinePassed));
        match lost {
            Some(reason) => Err(Error::LeaseLost {
                lease: self.id,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Waits at most `timeout` for the keep-alive task to report the lease lost.
    pub fn wait_lost(&self, timeout: Duration) -> Option<LossReason> {
        let s = self.shared.lock();
        let (s, _) = self
            .shared
            .changed
            .wait_timeout_while(s, timeout, |s| s.lost.is_none())
            .unwrap_or_else(|p| p.into_inner());
        s.lost
    }

    /// Waits at most `timeout` until `renewals` keep-alives have succeeded in all; true if so.
    pub fn wait_renewals(&self, renewals: u64, timeout: Duration) -> bool {
        let s = self.shared.lock();
        let (s, _) = self
            .shared
            .changed
            .wait_timeout_while(s, timeout, |s| s.renewals < renewals && s.lost.is_none())
            .unwrap_or_else(|p| p.into_inner());
        s.renewals >= renewals
    }

    /// Stops keeping the lease alive without revoking it: its keys stay until the cluster
    /// expires it (what a crashed or cut-off host looks like to the others).
    pub fn stop_keepalive(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Revokes the lease: the cluster deletes every key attached to it at once.
    pub fn revoke(mut self) -> Result<(), Error> {
        self.stop_keepalive();
        let id = self.id.0;
        let t = self.etcd.config().request_timeout();
        let r = self.etcd.run("lease revoke", t, |mut c| async move {
            match c.lease_revoke(id).await {
                Ok(_) => Ok(()),
                // Already gone (a retry after a lost reply, or expired): revoked all the same.
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        });
        self.shared.lose(LossReason::Revoked);
        r
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.stop_keepalive();
    }
}

/// The keep-alive task.
struct KeepAlive {
    inner: Arc<crate::client::Inner>,
    id: LeaseId,
    shared: Arc<Shared>,
    interval: Duration,
    margin: Duration,
    attempt_timeout: Duration,
}

/// A keep-alive stream and the member it goes to.
type KeepAliveStream = (usize, LeaseKeeper, LeaseKeepAliveStream);

/// The pause before retrying a failed keep-alive (on a new stream, maybe another member).
const RETRY: Duration = Duration::from_millis(200);

enum Outcome {
    Renewed(Duration),
    Gone,
    Failed(String),
}

impl KeepAlive {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut stream: Option<KeepAliveStream> = None;
        loop {
            let now = BootTime::now();
            let deadline = self.shared.lock().deadline;
            if now >= deadline {
                self.shared.lose(LossReason::DeadlinePassed);
                return;
            }
            // One attempt, bounded by the deadline and the request timeout.
            let bound = deadline.remaining().min(self.attempt_timeout);
            let sent = BootTime::now();
            let outcome = tokio::select! {
                _ = &mut stop => return,
                r = tokio::time::timeout(bound, self.renew(&mut stream)) => match r {
                    Ok(o) => o,
                    Err(_) => Outcome::Failed(format!("no answer in {bound:?}")),
                },
            };
            let pause = match outcome {
                Outcome::Renewed(ttl) => {
                    let mut s = self.shared.lock();
                    s.ttl = ttl;
                    s.renewed_at = sent;
                    s.deadline = deadline_max(s.deadline, sent, ttl, self.margin);
                    s.renewals += 1;
                    self.shared.changed.notify_all();
                    self.interval.saturating_sub(sent.0.saturating_sub(now.0))
                }
                Outcome::Gone => {
                    self.shared.lose(LossReason::Expired);
                    return;
                }
                Outcome::Failed(e) => {
                    // A reply may still come on the old stream and would be taken for the
                    // next request's: start a new stream, on the next member.
                    if let Some((member, _, _)) = stream.take() {
                        self.inner.failed(member);
                    }
                    tracing::warn!(lease = %self.id, error = %e, "etcd keep-alive failed; retrying");
                    RETRY
                }
            };
            let pause = pause.min(self.shared.lock().deadline.remaining());
            // The keep-alive period (a timer, not a wait for an event), cut short by a stop.
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn renew(&self, stream: &mut Option<KeepAliveStream>) -> Outcome {
        if stream.is_none() {
            let (member, mut c) = match self.inner.member().await {
                Ok(m) => m,
                Err((member, e)) => {
                    self.inner.failed(member);
                    let e = e.map_or_else(|reason| reason, |e| e.to_string());
                    return Outcome::Failed(format!("{}: {e}", self.inner.endpoint(member)));
                }
            };
            match c.lease_keep_alive(self.id.0).await {
                Ok((keeper, responses)) => *stream = Some((member, keeper, responses)),
                Err(e) => {
                    self.inner.failed(member);
                    return Outcome::Failed(format!("{}: {e}", self.inner.endpoint(member)));
                }
            }
        }
        let Some((_, keeper, responses)) = stream.as_mut() else {
            return Outcome::Failed("no stream".into());
        };
        if let Err(e) = keeper.keep_alive().await {
            return Outcome::Failed(e.to_string());
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() > 0 => {
                Outcome::Renewed(Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0)))
            }
            Ok(Some(_)) => Outcome::Gone,
            Ok(None) => Outcome::Failed("keep-alive stream ended".into()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                Outcome::Gone
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// The later of the deadline in force and the one a success sent at `sent` gives (a success's
/// deadline is never moved backwards).
fn deadline_max(current: BootTime, sent: BootTime, ttl: Duration, margin: Duration) -> BootTime {
    current.max(deadline(sent, ttl, margin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_follows_the_rule() {
        let d = deadline(
            BootTime(Duration::from_secs(100)),
            Duration::from_secs(10),
            Duration::from_secs(1),
        );
        // 100 + 10·(1 − 10⁻³) − 1 = 108.99 s
        assert_eq!(d.0, Duration::from_millis(108_990));
        assert!(BootTime::now() > BootTime(Duration::ZERO));
    }
}
