//! What the daemon tells its operators: Prometheus metrics and the event stream.
//!
//! Both are recorded from the request paths, often with the table locked, so recording is a few
//! memory operations only: atomic counters and histograms, and a push on a bounded ring of
//! events. Everything that can wait happens elsewhere, with the table unlocked: encoding the
//! metrics (at a scrape), the tracing line of each event ([`EventLog::flush`]), and delivery to
//! subscribers, each on its own connection's thread reading the ring from its own position. A
//! subscriber that falls behind by more than its queue is dropped with an error; the daemon never
//! waits for one.

use crate::proto::{Event, EventBatch, EventKind, EventPosition, VmIdentity};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use vmlock::Error;

/// Why a lock request was refused: the `reason` label of `vmlock_refusals_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as declared
pub enum RefusalReason {
    /// Another VM or a foreign process holds the resource (`Error::Busy`).
    busy,
    /// The VM is registered under another holder (`Error::OwnerExists`).
    owner_exists,
    /// Not the VM's holder, a restricted connection or an unauthorised peer.
    permission_denied,
    /// A bad request: resource, parameter, state or configuration (`require_lease_for_disks`).
    invalid,
    /// Anything else (I/O errors opening a disk, the supervisor gone, ...).
    other,
}

impl RefusalReason {
    /// Every reason, for pre-registering their series.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::busy,
        RefusalReason::owner_exists,
        RefusalReason::permission_denied,
        RefusalReason::invalid,
        RefusalReason::other,
    ];

    /// The class of `error`.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::Busy { .. } => RefusalReason::busy,
            Error::OwnerExists { .. } => RefusalReason::owner_exists,
            Error::PermissionDenied { .. } | Error::Restricted => RefusalReason::permission_denied,
            Error::InvalidResource { .. }
            | Error::InvalidParameter { .. }
            | Error::UnknownParameter { .. }
            | Error::InvalidState { .. }
            | Error::InvalidLockState { .. }
            | Error::UnknownOwner { .. }
            | Error::Config { .. }
            | Error::Protocol { .. } => RefusalReason::invalid,
            _ => RefusalReason::other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::busy => "busy",
            RefusalReason::owner_exists => "owner_exists",
            RefusalReason::permission_denied => "permission_denied",
            RefusalReason::invalid => "invalid",
            RefusalReason::other => "other",
        }
    }
}

/// What was done about a lost lease: the `action` label of `vmlock_lease_losses_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ActionTaken {
    /// The supervisor carried the action out through its VM manager.
    supervisor,
    /// The guest was paused (QMP `stop`).
    pause,
    /// The guest was powered off (SIGTERM, SIGKILL after the grace).
    poweroff,
    /// Nothing, as configured.
    ignore,
    /// Nothing: the guest had exited already.
    none,
}

impl ActionTaken {
    /// Every action, for pre-registering their series.
    pub const ALL: [ActionTaken; 5] = [
        ActionTaken::supervisor,
        ActionTaken::pause,
        ActionTaken::poweroff,
        ActionTaken::ignore,
        ActionTaken::none,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionTaken::supervisor => "supervisor",
            ActionTaken::pause => "pause",
            ActionTaken::poweroff => "poweroff",
            ActionTaken::ignore => "ignore",
            ActionTaken::none => "none",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: RefusalReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: ActionTaken,
}

/// The daemon's metrics (all named `vmlock_*`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    locks_held: Gauge,
    vms: Gauge,
    grants: Counter,
    refusals: Family<ReasonLabel, Counter>,
    releases: Counter,
    owner_deaths: Counter,
    lease_losses: Family<ActionLabel, Counter>,
    restarts: Counter,
    locks_recovered: Counter,
    holder_reconnects: Counter,
    acquire_seconds: Histogram,
    release_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmlock");
        let m = Metrics {
            locks_held: Gauge::default(),
            vms: Gauge::default(),
            grants: Counter::default(),
            refusals: Family::default(),
            releases: Counter::default(),
            owner_deaths: Counter::default(),
            lease_losses: Family::default(),
            restarts: Counter::default(),
            locks_recovered: Counter::default(),
            holder_reconnects: Counter::default(),
            // 100 µs .. ~3.3 s
            acquire_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            release_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "locks_held",
            "Distinct locks held or being granted (a shared disk held by several VMs counts once)",
            m.locks_held.clone(),
        );
        registry.register("vms", "VMs known to the daemon", m.vms.clone());
        registry.register(
            "grants",
            "Acquire requests that took at least one lock",
            m.grants.clone(),
        );
        registry.register(
            "refusals",
            "Acquire and Hold requests refused, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "releases",
            "Release requests (release, shutdown) that released at least one lock",
            m.releases.clone(),
        );
        registry.register(
            "owner_deaths",
            "VMs whose guest exited while holding locks (the daemon unlocked them)",
            m.owner_deaths.clone(),
        );
        registry.register(
            "lease_losses",
            "Leases lost under a running guest, by the action taken",
            m.lease_losses.clone(),
        );
        registry.register(
            "daemon_restarts",
            "Daemon starts in this runtime directory before this one",
            m.restarts.clone(),
        );
        registry.register(
            "locks_recovered",
            "Locks recovered from the state files at start",
            m.locks_recovered.clone(),
        );
        registry.register(
            "holder_reconnects",
            "Holders that registered again for a VM the daemon knew or with descriptions to hand back",
            m.holder_reconnects.clone(),
        );
        registry.register_with_unit(
            "acquire_duration",
            "Acquire requests, from request read to reply written",
            Unit::Seconds,
            m.acquire_seconds.clone(),
        );
        registry.register_with_unit(
            "release_duration",
            "Release requests (release, shutdown), from request read to reply written",
            Unit::Seconds,
            m.release_seconds.clone(),
        );
        for reason in RefusalReason::ALL {
            let _ = m.refusals.get_or_create(&ReasonLabel { reason });
        }
        for action in ActionTaken::ALL {
            let _ = m.lease_losses.get_or_create(&ActionLabel { action });
        }
        Metrics { registry, ..m }
    }

    /// The text exposition (OpenMetrics 1.0, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// The table's size, after every change (under the table lock: two stores).
    pub fn table_size(&self, vms: usize, locks: usize) {
        self.vms.set(i64::try_from(vms).unwrap_or(i64::MAX));
        self.locks_held
            .set(i64::try_from(locks).unwrap_or(i64::MAX));
    }

    /// An acquire took locks.
    pub fn granted(&self) {
        self.grants.inc();
    }

    /// A lock request was refused.
    pub fn refused(&self, reason: RefusalReason) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A release released locks.
    pub fn released(&self) {
        self.releases.inc();
    }

    /// A VM's guest died with its locks.
    pub fn owner_died(&self) {
        self.owner_deaths.inc();
    }

    /// A lost lease was handled with `action`.
    pub fn lease_lost(&self, action: ActionTaken) {
        self.lease_losses
            .get_or_create(&ActionLabel { action })
            .inc();
    }

    /// At start: `boot` and what was recovered.
    pub fn started(&self, boot: u64, locks: usize) {
        self.restarts.inc_by(boot.saturating_sub(1));
        self.locks_recovered
            .inc_by(u64::try_from(locks).unwrap_or(u64::MAX));
    }

    /// A holder came back.
    pub fn holder_reconnected(&self) {
        self.holder_reconnects.inc();
    }

    /// An acquire request took `elapsed`.
    pub fn acquire_took(&self, elapsed: Duration) {
        self.acquire_seconds.observe(elapsed.as_secs_f64());
    }

    /// A release request took `elapsed`.
    pub fn release_took(&self, elapsed: Duration) {
        self.release_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Reads, bumps and writes back the boot number kept in `dir/vmlockd.boot` (1 at the first
/// start). Called at start, before anything is served.
pub fn next_boot(dir: &Path) -> std::io::Result<u64> {
    let path = dir.join("vmlockd.boot");
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
            tracing::warn!("ignoring unreadable {}", path.display());
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let boot = last + 1;
    let tmp = path.with_extension("boot.tmp");
    let kept =
        std::fs::write(&tmp, format!("{boot}\n")).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = kept {
        // A full runtime file system must not keep the daemon from starting (its holders are
        // waiting to hand their locks back): the number goes unrecorded, and the next start may
        // use it again (an event follower then sees one boot twice).
        let _ = std::fs::remove_file(&tmp);
        tracing::error!("recording the boot number in {}: {e}", path.display());
    }
    Ok(boot)
}

/// The last events, in order, and the subscribers' wake-up.
#[derive(Debug)]
pub struct EventLog {
    boot: u64,
    capacity: usize,
    ring: Mutex<Ring>,
    /// Signalled when events were added (after the table is unlocked).
    added: Condvar,
    /// Serialises [`EventLog::flush`], so tracing lines come in sequence order.
    logging: Mutex<()>,
}

#[derive(Debug)]
struct Ring {
    /// The number the next event gets.
    next_seq: u64,
    events: VecDeque<Arc<Event>>,
    /// Events not yet written as tracing lines.
    unlogged: VecDeque<Arc<Event>>,
    /// Subscribers waiting on `added` now: with none, a flush makes no wake-up call.
    waiting: usize,
}

/// A subscriber fell behind: the events it would need next are gone or too far back.
#[derive(Debug, thiserror::Error)]
#[error("this event subscriber fell behind by {behind} events (at most {allowed} may wait for it; event_subscriber_queue); resume from boot {boot} seq {seq} and read faster")]
pub struct FellBehind {
    /// Events waiting for it.
    pub behind: u64,
    /// The bound.
    pub allowed: usize,
    /// Its boot.
    pub boot: u64,
    /// The last event it got.
    pub seq: u64,
}

impl EventLog {
    /// An empty log for `boot` keeping the last `capacity` events.
    pub fn new(boot: u64, capacity: usize) -> Self {
        EventLog {
            boot,
            capacity: capacity.max(1),
            ring: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(capacity.min(4096)),
                unlogged: VecDeque::new(),
                waiting: 0,
            }),
            added: Condvar::new(),
            logging: Mutex::new(()),
        }
    }

    /// This daemon's boot.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `kind` now: numbers it and keeps it. Memory operations only (callers may hold the
    /// table lock); call [`EventLog::flush`] once the table is unlocked.
    pub fn record(&self, kind: EventKind) {
        let time_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut ring = self.ring();
        let event = Arc::new(Event {
            boot: self.boot,
            seq: ring.next_seq,
            time_ms,
            kind,
        });
        ring.next_seq += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(Arc::clone(&event));
        // Bounded too: a flush that never came (it always does) must not grow this forever.
        if ring.unlogged.len() == self.capacity {
            ring.unlogged.pop_front();
        }
        ring.unlogged.push_back(event);
    }

    /// With the table unlocked: writes a tracing line (with fields, which journald keeps as
    /// fields) for every event recorded since the last flush, and wakes the subscribers.
    pub fn flush(&self) {
        let _order = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        let (batch, waiting) = {
            let mut ring = self.ring();
            let batch: Vec<Arc<Event>> = ring.unlogged.drain(..).collect();
            (batch, ring.waiting)
        };
        if batch.is_empty() {
            return;
        }
        // A subscriber that starts waiting after this looked first checks, under the ring's
        // lock, for the events just recorded, so skipping the call loses no wake-up.
        if waiting > 0 {
            self.added.notify_all();
        }
        for e in batch {
            log_event(&e);
        }
    }

    /// The position of the last event recorded.
    pub fn last(&self) -> EventPosition {
        EventPosition {
            boot: self.boot,
            seq: self.ring().next_seq - 1,
        }
    }

    /// Buffered events after `after` (all of them for an earlier boot or `None`), at most `max`,
    /// and how many asked for are no longer buffered.
    pub fn since(&self, after: Option<EventPosition>, max: usize) -> (Vec<Arc<Event>>, u64) {
        let after_seq = self.after_seq(after);
        let ring = self.ring();
        let oldest = ring.events.front().map_or(ring.next_seq, |e| e.seq);
        let missed = oldest.saturating_sub(after_seq + 1);
        let skip = usize::try_from((after_seq + 1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        let events = ring.events.iter().skip(skip).take(max).cloned().collect();
        (events, missed)
    }

    fn after_seq(&self, after: Option<EventPosition>) -> u64 {
        match after {
            Some(p) if p.boot == self.boot => p.seq,
            _ => 0,
        }
    }

    /// For a subscriber that got everything up to `seq`: waits (at most `timeout`) for events
    /// after it, and returns at most `max` of them; refuses a subscriber more than `allowed`
    /// events behind.
    pub fn wait_after(
        &self,
        seq: u64,
        allowed: usize,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Arc<Event>>, FellBehind> {
        let deadline = Instant::now() + timeout;
        let mut ring = self.ring();
        loop {
            let behind = (ring.next_seq - 1).saturating_sub(seq);
            let oldest = ring.events.front().map_or(ring.next_seq, |e| e.seq);
            if behind > allowed as u64 || oldest > seq + 1 {
                return Err(FellBehind {
                    behind,
                    allowed,
                    boot: self.boot,
                    seq,
                });
            }
            if behind > 0 {
                let skip = usize::try_from(seq + 1 - oldest).unwrap_or(usize::MAX);
                return Ok(ring.events.iter().skip(skip).take(max).cloned().collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            ring.waiting += 1;
            ring = self
                .added
                .wait_timeout(ring, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            ring.waiting -= 1;
        }
    }

    /// A batch for the wire.
    pub fn batch(&self, events: &[Arc<Event>], missed: u64, end_of_buffer: bool) -> EventBatch {
        EventBatch {
            boot: self.boot,
            events: events.iter().map(|e| Event::clone(e)).collect(),
            missed,
            end_of_buffer,
        }
    }
}

/// One tracing line per event, its fields as tracing fields.
fn log_event(e: &Event) {
    let (boot, seq) = (e.boot, e.seq);
    let kind = e.kind.name();
    // Borrowed, not copied: at the default level most of these lines are filtered out.
    fn vm(v: &VmIdentity) -> (&str, &str, u32) {
        (&v.name, &v.uuid, v.pid)
    }
    match &e.kind {
        EventKind::Acquired { vm: v, resources } | EventKind::Released { vm: v, resources } => {
            let (name, uuid, pid) = vm(v);
            tracing::info!(target: "vmlock::event", boot, seq, kind, vm = %name, uuid = %uuid, pid, resources = ?resources, "{kind}");
        }
        EventKind::Refused {
            vm: v,
            request,
            reason,
            resource,
            holder,
            error,
        } => {
            let (name, uuid, pid) = vm(v);
            tracing::info!(target: "vmlock::event", boot, seq, kind, vm = %name, uuid = %uuid, pid, request = %request, reason = %reason, resource = ?resource, holder = ?holder, error = %error, "refused");
        }
        EventKind::OwnerDied { vm: v, locks } => {
            let (name, uuid, pid) = vm(v);
            tracing::info!(target: "vmlock::event", boot, seq, kind, vm = %name, uuid = %uuid, pid, locks, "owner died");
        }
        EventKind::LeaseLost {
            vm: v,
            resources,
            action,
        } => {
            let (name, uuid, pid) = vm(v);
            tracing::warn!(target: "vmlock::event", boot, seq, kind, vm = %name, uuid = %uuid, pid, resources = ?resources, action = %action, "lease lost");
        }
        EventKind::ActionTaken { vm: v, action } => {
            let (name, uuid, pid) = vm(v);
            tracing::warn!(target: "vmlock::event", boot, seq, kind, vm = %name, uuid = %uuid, pid, action = %action, "lock-failure action taken");
        }
        EventKind::DaemonStarted { pid, vms, locks }
        | EventKind::DaemonRestarted { pid, vms, locks } => {
            tracing::info!(target: "vmlock::event", boot, seq, kind, pid, vms, locks, "{kind}");
        }
    }
}

/// How long the metrics responder waits on one HTTP client.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` (HTTP/1.0, one connection at a time, each bounded by
/// [`HTTP_TIMEOUT`]) on its own thread. Never touches the table: encoding reads atomics.
pub fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer_http(s, &metrics) {
                            tracing::debug!("metrics client: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("metrics listener: {e}");
                        // Out of descriptors: do not spin.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map(|_| ())
}

fn answer_http(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut stream,
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &metrics.encode(),
        ),
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        ),
    }
}

fn respond(stream: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vm(n: &str) -> VmIdentity {
        VmIdentity {
            uuid: format!("u-{n}"),
            name: n.into(),
            id: 1,
            pid: 2,
        }
    }

    fn acquired(n: &str) -> EventKind {
        EventKind::Acquired {
            vm: vm(n),
            resources: vec!["/d".into()],
        }
    }

    #[test]
    fn the_ring_keeps_the_last_events_in_order_and_says_what_was_missed() {
        let log = EventLog::new(4, 3);
        for i in 0..5 {
            log.record(acquired(&i.to_string()));
        }
        log.flush();
        let (events, missed) = log.since(None, 100);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(missed, 2);
        let (events, missed) = log.since(Some(EventPosition { boot: 4, seq: 3 }), 100);
        assert_eq!(events.len(), 2);
        assert_eq!(missed, 0);
        // Another boot's position: everything buffered.
        let (events, _) = log.since(Some(EventPosition { boot: 3, seq: 9 }), 100);
        assert_eq!(events.len(), 3);
        assert_eq!(log.last(), EventPosition { boot: 4, seq: 5 });
    }

    #[test]
    fn a_subscriber_too_far_behind_is_refused_not_waited_for() {
        let log = EventLog::new(1, 100);
        for i in 0..10 {
            log.record(acquired(&i.to_string()));
        }
        let e = log
            .wait_after(0, 5, 100, Duration::from_millis(1))
            .unwrap_err();
        assert_eq!(e.behind, 10);
        assert!(e.to_string().contains("fell behind"), "{e}");
        let got = log.wait_after(8, 5, 100, Duration::from_millis(1)).unwrap();
        assert_eq!(got.len(), 2);
        assert!(log
            .wait_after(10, 5, 100, Duration::from_millis(1))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn events_serialise_flat_with_their_kind() {
        let log = EventLog::new(2, 10);
        log.record(acquired("a"));
        let (events, _) = log.since(None, 10);
        let json = serde_json::to_value(&*events[0]).unwrap();
        assert_eq!(json["kind"], "acquired");
        assert_eq!(json["boot"], 2);
        assert_eq!(json["seq"], 1);
        assert_eq!(json["vm"]["name"], "a");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, *events[0]);
    }

    #[test]
    fn every_metric_is_exposed_with_its_prefix() {
        let m = Metrics::new();
        m.refused(RefusalReason::busy);
        let text = m.encode();
        for name in [
            "vmlock_locks_held",
            "vmlock_vms",
            "vmlock_grants_total",
            "vmlock_refusals_total{reason=\"busy\"} 1",
            "vmlock_refusals_total{reason=\"owner_exists\"} 0",
            "vmlock_releases_total",
            "vmlock_owner_deaths_total",
            "vmlock_lease_losses_total{action=\"poweroff\"} 0",
            "vmlock_daemon_restarts_total",
            "vmlock_locks_recovered_total",
            "vmlock_holder_reconnects_total",
            "vmlock_acquire_duration_seconds_bucket",
            "vmlock_release_duration_seconds_count",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    /// `dist/grafana/vmlock.json` is valid JSON and every `vmlock_*` name its queries use is a
    /// series the daemon exposes.
    #[test]
    fn the_grafana_dashboard_queries_only_registered_metrics() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/grafana/vmlock.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        let exposed: std::collections::BTreeSet<String> = Metrics::new()
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
            .collect();
        fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match (k.as_str(), v) {
                            ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                            _ => exprs(v, out),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
                _ => {}
            }
        }
        let mut queries = Vec::new();
        exprs(&dashboard, &mut queries);
        assert!(queries.len() >= 10, "{queries:?}");
        let mut used = std::collections::BTreeSet::new();
        for q in &queries {
            let mut rest = q.as_str();
            while let Some(at) = rest.find("vmlock_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
        let unknown: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "not exposed: {unknown:?} (exposed: {exposed:?})"
        );
        // Every metric appears on the dashboard.
        let families: std::collections::BTreeSet<&str> = exposed
            .iter()
            .map(|n| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
                    .unwrap_or(n)
            })
            .collect();
        for f in families {
            assert!(used.iter().any(|u| u.starts_with(f)), "{f} is on no panel");
        }
    }

    #[test]
    fn refusal_reasons_follow_the_error() {
        assert_eq!(
            RefusalReason::of(&Error::Busy {
                resource: "/d".into(),
                holder: vmlock::ForeignHolder::Unknown
            }),
            RefusalReason::busy
        );
        assert_eq!(
            RefusalReason::of(&Error::Restricted),
            RefusalReason::permission_denied
        );
        assert_eq!(
            RefusalReason::of(&Error::ServiceUnavailable { reason: "x".into() }),
            RefusalReason::other
        );
    }
}
