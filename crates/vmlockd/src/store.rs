//! What survives a daemon restart: a snapshot (`state.json`) and journals of per-VM changes since
//! it. Each change appends one line with the VM's whole entry (or its removal) and a sequence
//! number, so a request costs one small write to a descriptor already open, however many locks
//! the host holds.
//!
//! The snapshot is rewritten once the journal outgrows the table, **with the table unlocked**:
//! under the table lock the store only switches appends to its second journal (both are open from
//! the start, so nothing is opened there) and hands back a [`PendingSnapshot`] of the table as it
//! was; the caller writes it afterwards, then empties the journal it switched away from. A crash
//! at any point replays correctly: the snapshot names the last change it holds, and lines of both
//! journals are replayed in sequence order on top of it, those it already holds skipped.

use crate::runtime::RuntimeDir;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmlock_core::types::LockKey;
use vmlock_core::{Persisted, PersistedOwner};

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
struct Change {
    uuid: String,
    owner: Option<PersistedOwner>,
    /// Order of the change (0 in lines written before journals were numbered).
    #[serde(default)]
    seq: u64,
}

/// `state.json`: the table and the last change it holds.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    #[serde(default)]
    seq: u64,
    #[serde(flatten)]
    state: Persisted,
}

/// A journal line as written: [`Change`]'s fields, borrowed.
#[derive(Serialize)]
struct ChangeOut<'a> {
    uuid: &'a str,
    owner: Option<&'a PersistedOwner>,
    seq: u64,
}

/// `state.json` as written: [`SnapshotFile`]'s fields, borrowed.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    seq: u64,
    owners: Vec<&'a PersistedOwner>,
    versions: Vec<(LockKey, &'a str, u64)>,
}

/// The snapshot and the journals.
#[derive(Debug)]
pub struct Store {
    runtime: RuntimeDir,
    /// `state.journal` and `state.journal.1`; appends go to `journals[current]`. Shared with the
    /// lines on their way there ([`JournalLine`]).
    journals: [Arc<File>; 2],
    current: usize,
    /// The last change numbered.
    seq: u64,
    /// Lines in the current journal.
    lines: usize,
    /// A snapshot was handed out and not yet written.
    snapshot_pending: bool,
    /// The last change whose append failed: the journals lack it until a snapshot holding it
    /// is written.
    missed: Option<u64>,
    /// What the lines numbered so far say (what a replay of them would give): a snapshot is
    /// taken from it, sharing the entries, so the table is never copied under its lock.
    recorded: Recorded,
}

/// Every VM's entry and the highest version of every lock, as journal lines leave them. The
/// replay at start and the store's record that snapshots are taken from apply lines here, the
/// same way.
#[derive(Debug, Default)]
struct Recorded {
    owners: BTreeMap<String, Arc<PersistedOwner>>,
    /// By key: a journal names every grant of a VM on each of its lines, so a search of a list
    /// per grant made 10,000 recovered grants cost 50 ms.
    versions: HashMap<LockKey, (Arc<str>, u64)>,
}

impl Recorded {
    fn from_persisted(full: Persisted) -> Self {
        Recorded {
            owners: full
                .owners
                .into_iter()
                .map(|o| (o.vm.uuid.clone(), Arc::new(o)))
                .collect(),
            versions: full
                .versions
                .into_iter()
                .map(|(key, uuid, version)| (key, (Arc::from(uuid.as_str()), version)))
                .collect(),
        }
    }

    /// One line: VM `uuid`'s new entry (`None`: it holds nothing any more). Versions never go
    /// back, whichever VM's line comes last.
    fn apply(&mut self, uuid: &str, owner: Option<Arc<PersistedOwner>>) {
        let Some(owner) = owner else {
            self.owners.remove(uuid);
            return;
        };
        for (key, _, _, version) in &owner.grants {
            match self.versions.get_mut(key) {
                Some((_, seen)) if *seen >= *version => {}
                Some(entry) => *entry = (Arc::from(uuid), *version),
                None => {
                    self.versions.insert(*key, (Arc::from(uuid), *version));
                }
            }
        }
        self.owners.insert(uuid.to_owned(), owner);
    }

    fn into_persisted(self) -> Persisted {
        let mut versions: Vec<(LockKey, String, u64)> = self
            .versions
            .into_iter()
            .map(|(key, (uuid, version))| (key, uuid.to_string(), version))
            .collect();
        versions.sort_by_key(|(key, _, _)| *key);
        Persisted {
            owners: self
                .owners
                .into_values()
                .map(|o| Arc::try_unwrap(o).unwrap_or_else(|shared| (*shared).clone()))
                .collect(),
            versions,
        }
    }
}

/// A snapshot to write with the table unlocked ([`PendingSnapshot::write`]), then
/// [`Store::snapshot_written`].
#[derive(Debug)]
pub struct PendingSnapshot {
    owners: Vec<Arc<PersistedOwner>>,
    versions: Vec<(LockKey, Arc<str>, u64)>,
    seq: u64,
    path: PathBuf,
    /// The journal appends switched away from: every line in it is in the snapshot. (A line
    /// numbered before the switch may still be on its way there; emptied or not, the snapshot
    /// holds it, and the replay skips it by its number.)
    old_journal: Arc<File>,
}

fn journal_paths(runtime: &RuntimeDir) -> [PathBuf; 2] {
    let first = runtime.state_file().with_extension("journal");
    let second = runtime.state_file().with_extension("journal.1");
    [first, second]
}

fn open_journal(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn read_changes(path: &Path, into: &mut Vec<Change>) {
    let Ok(file) = File::open(path) else {
        return;
    };
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        match serde_json::from_str::<Change>(&line) {
            Ok(c) => into.push(c),
            Err(e) => tracing::warn!("skipping a journal line of {}: {e}", path.display()),
        }
    }
}

impl Store {
    /// Opens the store and returns what it holds (snapshot with the journals replayed on top).
    /// Unreadable lines are skipped: the kernel still holds every lock, and holders hand their
    /// descriptions back, so a lost line only delays naming a holder.
    pub fn open(runtime: &RuntimeDir) -> std::io::Result<(Self, Persisted)> {
        let snapshot = match std::fs::read(runtime.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(
                    "ignoring unreadable {}: {e}",
                    runtime.state_file().display()
                );
                SnapshotFile {
                    seq: 0,
                    state: Persisted::default(),
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SnapshotFile {
                seq: 0,
                state: Persisted::default(),
            },
            Err(e) => return Err(e),
        };
        let paths = journal_paths(runtime);
        let mut changes = Vec::new();
        for path in &paths {
            read_changes(path, &mut changes);
        }
        // Appends are numbered under the table lock, so the numbers give the order across both
        // journals; unnumbered (older) lines keep their file order.
        changes.sort_by_key(|c| c.seq);
        let SnapshotFile {
            seq: snapshot_seq,
            state,
        } = snapshot;
        let mut recorded = Recorded::from_persisted(state);
        let mut seq = snapshot_seq;
        for change in changes {
            if change.seq != 0 && change.seq <= snapshot_seq {
                continue; // already in the snapshot
            }
            seq = seq.max(change.seq);
            recorded.apply(&change.uuid, change.owner.map(Arc::new));
        }
        let persisted = recorded.into_persisted();
        let journals = [
            Arc::new(open_journal(&paths[0])?),
            Arc::new(open_journal(&paths[1])?),
        ];
        Ok((
            Store {
                runtime: runtime.clone(),
                journals,
                current: 0,
                seq,
                lines: 0,
                snapshot_pending: false,
                missed: None,
                recorded: Recorded::default(),
            },
            persisted,
        ))
    }

    /// Numbers the new entry of VM `uuid` (`None`: it holds nothing any more) and picks its
    /// journal. Called with the table locked, so lines are numbered in the table's order; the
    /// returned line is encoded and appended with the table unlocked ([`JournalLine::append`]),
    /// before the request is answered.
    pub fn record(&mut self, uuid: &str, owner: Option<PersistedOwner>) -> JournalLine {
        self.seq += 1;
        self.lines += 1;
        let owner = owner.map(Arc::new);
        self.recorded.apply(uuid, owner.clone());
        JournalLine {
            uuid: uuid.to_owned(),
            owner,
            seq: self.seq,
            journal: Arc::clone(&self.journals[self.current]),
        }
    }

    /// The append of line `seq` failed: the journals lack it until a snapshot holding it is
    /// written, so the next change forces one.
    pub fn append_failed(&mut self, seq: u64) {
        self.missed = Some(self.missed.map_or(seq, |m| m.max(seq)));
    }

    /// Whether the journal has outgrown a table of `owners` VMs (and no snapshot is on its way).
    pub fn wants_snapshot(&self, owners: usize) -> bool {
        !self.snapshot_pending && (self.missed.is_some() || self.lines > 1024.max(owners * 4))
    }

    /// With the table locked: switches appends to the other journal (empty: emptied when the last
    /// snapshot was written) and returns the state the lines numbered so far leave, to write with
    /// the table unlocked. Costs a shared reference per VM and per lock, no copy of an entry.
    pub fn begin_snapshot(&mut self) -> Option<PendingSnapshot> {
        if self.snapshot_pending {
            return None;
        }
        let owners = self.recorded.owners.values().cloned().collect();
        let versions = self
            .recorded
            .versions
            .iter()
            .map(|(key, (uuid, version))| (*key, Arc::clone(uuid), *version))
            .collect();
        let old_journal = Arc::clone(&self.journals[self.current]);
        self.current = 1 - self.current;
        self.lines = 0;
        self.snapshot_pending = true;
        Some(PendingSnapshot {
            owners,
            versions,
            seq: self.seq,
            path: self.runtime.state_file(),
            old_journal,
        })
    }

    /// The snapshot handed out was written (or failed): another may start.
    pub fn snapshot_written(&mut self) {
        self.snapshot_pending = false;
    }

    /// A snapshot holding the changes up to `seq` was written: a change whose append failed
    /// is in it if it came no later.
    pub fn snapshot_succeeded(&mut self, seq: u64) {
        if self.missed.is_some_and(|m| m <= seq) {
            self.missed = None;
        }
    }

    /// At start, a snapshot of everything replayed. When the journal appends switch to is empty
    /// (the usual case) it is handed out, to be written once the daemon serves: until it is
    /// written, the old snapshot and journal replay to the same state, and new appends go to the
    /// empty journal. Otherwise (a crash during a snapshot left lines in both journals) it is
    /// written now and both are emptied, before anything else appends.
    pub fn start_snapshot(&mut self, full: Persisted) -> Option<PendingSnapshot> {
        self.recorded = Recorded::from_persisted(full);
        let next_is_empty = self.journals[1 - self.current]
            .metadata()
            .is_ok_and(|m| m.len() == 0);
        if next_is_empty {
            self.begin_snapshot()
        } else {
            self.write_now();
            None
        }
    }

    /// Writes a full snapshot now and empties both journals (at start, before anything else
    /// appends).
    pub fn snapshot_now(&mut self, full: Persisted) {
        self.recorded = Recorded::from_persisted(full);
        self.write_now();
    }

    fn write_now(&mut self) {
        if let Some(pending) = self.begin_snapshot() {
            let seq = pending.seq;
            if pending.write() {
                self.snapshot_succeeded(seq);
                for journal in &self.journals {
                    if let Err(e) = journal.set_len(0) {
                        tracing::error!("emptying a state journal: {e}");
                    }
                }
                self.lines = 0;
            }
            self.snapshot_written();
        }
    }
}

impl PendingSnapshot {
    /// The last change the snapshot holds.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Writes the snapshot, then empties the journal whose lines it holds. A crash in between
    /// leaves lines the next start skips by their numbers. Returns whether it was written.
    pub fn write(self) -> bool {
        let tmp = self.path.with_extension("tmp");
        let mut owners: Vec<&PersistedOwner> = self.owners.iter().map(|o| &**o).collect();
        owners.sort_by(|a, b| a.vm.uuid.cmp(&b.vm.uuid));
        let mut versions: Vec<(LockKey, &str, u64)> = self
            .versions
            .iter()
            .map(|(key, uuid, version)| (*key, &**uuid, *version))
            .collect();
        versions.sort();
        let file = SnapshotOut {
            seq: self.seq,
            owners,
            versions,
        };
        let result = serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                std::fs::rename(&tmp, &self.path)?;
                self.old_journal.set_len(0)
            });
        match result {
            Ok(()) => true,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::error!("writing {}: {e}", self.path.display());
                false
            }
        }
    }
}

/// One change on its way to a journal: numbered under the table lock, encoded and written
/// without any lock held.
#[derive(Debug)]
#[must_use = "a change is recorded only once its line is appended"]
pub struct JournalLine {
    uuid: String,
    owner: Option<Arc<PersistedOwner>>,
    seq: u64,
    journal: Arc<File>,
}

impl JournalLine {
    /// The change's number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Encodes the line and appends it with one `write` (the journal is opened `O_APPEND`, so
    /// lines written by several threads at once never interleave; their file order may differ
    /// from their numbers, which the replay sorts by). Holds no lock: a slow write delays only
    /// its own request. Returns false if the line did not go in whole; the caller reports that
    /// ([`Store::append_failed`]) so that a snapshot follows.
    pub fn append(self) -> bool {
        let change = ChangeOut {
            uuid: &self.uuid,
            owner: self.owner.as_deref(),
            seq: self.seq,
        };
        let mut line = match serde_json::to_vec(&change) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("encoding a journal line: {e}");
                return false;
            }
        };
        line.push(b'\n');
        let mut journal = &*self.journal;
        let result = loop {
            match journal.write(&line) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(n) if n == line.len() => true,
            Ok(n) => {
                // A full file system (say) took part of the line. Writing the rest could land
                // after another thread's line, so the part is ended with a newline instead: it
                // is skipped as unreadable at replay, and the lines after it stand on their own.
                // (If even that fails the next line may be lost with it; the snapshot that
                // follows holds both.)
                if n > 0 {
                    let _ = journal.write(b"\n");
                }
                tracing::error!(
                    "appending to the state journal: wrote {n} of {} bytes; a snapshot will follow",
                    line.len()
                );
                false
            }
            Err(e) => {
                tracing::error!("appending to the state journal: {e}; a snapshot will follow");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LinuxHost;
    use vmlock_core::{LockTable, Policy};
    use vmlock_sys::pidfd::ProcessHandle;

    fn owner(name: &str) -> PersistedOwner {
        let me = std::process::id();
        let started = vmlock::process::stat(me).unwrap().start_time;
        serde_json::from_value(serde_json::json!({
            "vm": {"uuid": uuid_of(name), "name": name, "id": 1, "pid": me},
            "holder_pid": me, "start_time": started, "flags": {"register_only": false, "restrict": false, "on_lock_failure": "Poweroff"},
            "grants": [[{"dev": 1, "ino": 2, "byte": 0}, {"Disk": {"path": "/d", "mode": "Exclusive"}}, {"secs_since_epoch": 1, "nanos_since_epoch": 0}, 3]]
        }))
        .unwrap()
    }

    fn uuid_of(name: &str) -> String {
        format!("7c9e6679-7425-40de-944b-e07fc1f90a{name}")
    }

    fn names(p: &Persisted) -> Vec<String> {
        p.owners.iter().map(|o| o.vm.name.clone()).collect()
    }

    #[test]
    fn journal_replays_on_the_snapshot_and_snapshots_empty_it() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, empty) = Store::open(&runtime).unwrap();
        assert!(empty.owners.is_empty());
        assert!(store.record("a", Some(owner("a1"))).append());
        assert!(store.record("b", Some(owner("b2"))).append());
        assert!(store.record("a", None).append());
        let (mut store, replayed) = Store::open(&runtime).unwrap();
        assert_eq!(replayed.owners.len(), 1);
        let mut table = LockTable::<LinuxHost>::new(Policy::default(), "h".into());
        let recovered = table.recover(replayed, |pid, start| {
            ProcessHandle::open(pid, Some(start)).ok()
        });
        assert_eq!(recovered, 1);
        store.snapshot_now(table.persisted());
        for path in journal_paths(&runtime) {
            assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
        }
        let (_, again) = Store::open(&runtime).unwrap();
        assert_eq!(again.owners.len(), 1);
    }

    /// The start snapshot is handed out (to be written while the daemon serves) when appends
    /// switch to an empty journal; a crash before it is written replays to the same state. When
    /// both journals hold lines (a crash during a snapshot), it is written at once.
    #[test]
    fn the_start_snapshot_waits_only_when_nothing_can_be_lost() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        assert!(store.record(&uuid_of("a1"), Some(owner("a1"))).append());
        let (mut store, full) = Store::open(&runtime).unwrap();
        let pending = store.start_snapshot(full).expect("handed out");
        assert!(store.record(&uuid_of("b2"), Some(owner("b2"))).append());
        // A crash before it is written: the old journal and the new one.
        let (_, crashed) = Store::open(&runtime).unwrap();
        assert_eq!(names(&crashed), vec!["a1", "b2"]);
        assert!(pending.write());
        store.snapshot_written();
        let (_, after) = Store::open(&runtime).unwrap();
        assert_eq!(names(&after), vec!["a1", "b2"]);

        // Lines in both journals (the b2 line is in the second): written now, nothing handed out.
        assert!(store.record(&uuid_of("c3"), Some(owner("c3"))).append());
        let paths = journal_paths(&runtime);
        std::fs::write(&paths[0], std::fs::read(&paths[1]).unwrap()).unwrap();
        let (mut store, full) = Store::open(&runtime).unwrap();
        assert!(store.start_snapshot(full).is_none());
        for path in &paths {
            assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
        }
        let (_, again) = Store::open(&runtime).unwrap();
        assert_eq!(names(&again), vec!["a1", "b2", "c3"]);
    }

    /// Versions never go back: the highest seen per lock survives a replay, whichever VM's line
    /// came last, and a removal keeps the version.
    #[test]
    fn replay_keeps_the_highest_version_per_lock() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        let with_version = |name: &str, version: u64| {
            let mut o = owner(name);
            o.grants[0].3 = version;
            o
        };
        assert!(store
            .record(&uuid_of("a1"), Some(with_version("a1", 5)))
            .append());
        assert!(store
            .record(&uuid_of("b2"), Some(with_version("b2", 3)))
            .append());
        assert!(store.record(&uuid_of("b2"), None).append());
        let (_, replayed) = Store::open(&runtime).unwrap();
        let key = owner("a1").grants[0].0;
        assert_eq!(replayed.versions, vec![(key, uuid_of("a1"), 5)]);
        assert!(store
            .record(&uuid_of("b2"), Some(with_version("b2", 6)))
            .append());
        let (_, replayed) = Store::open(&runtime).unwrap();
        assert_eq!(replayed.versions, vec![(key, uuid_of("b2"), 6)]);
    }

    /// A snapshot taken while changes go on: the changes after it survive in the other journal,
    /// and a crash at any point of the hand-over replays to the latest state.
    #[test]
    fn changes_made_while_a_snapshot_is_written_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        assert!(store.record(&uuid_of("a1"), Some(owner("a1"))).append());
        let pending = store.begin_snapshot().expect("a snapshot");
        // More changes land before the snapshot is written (the table is unlocked by then).
        assert!(store.record(&uuid_of("b2"), Some(owner("b2"))).append());
        assert!(store.record(&uuid_of("a1"), None).append());
        assert!(store.begin_snapshot().is_none(), "one at a time");
        // A crash now: the old snapshot (none) plus both journals.
        let (_, crashed_before) = Store::open(&runtime).unwrap();
        assert_eq!(names(&crashed_before), vec!["b2"]);
        assert!(pending.write());
        store.snapshot_written();
        // A crash after: the snapshot plus the lines that came after it.
        let (_, crashed_after) = Store::open(&runtime).unwrap();
        assert_eq!(names(&crashed_after), vec!["b2"]);
        // The next snapshot switches back to the first journal, emptied by the last one.
        assert!(store.begin_snapshot().is_some());
        assert_eq!(
            std::fs::metadata(&journal_paths(&runtime)[0])
                .unwrap()
                .len(),
            0
        );
    }

    /// Lines are numbered under the table lock and appended after it, by several threads: their
    /// file order may differ from their numbers, and a line numbered before a snapshot switch
    /// may land in the old journal after the snapshot emptied it. The replay follows the numbers.
    #[test]
    fn lines_appended_out_of_order_or_late_replay_by_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        let first = store.record(&uuid_of("a1"), Some(owner("a1")));
        let second = store.record(&uuid_of("a1"), None);
        assert!(second.append());
        assert!(first.append());
        let (_, replayed) = Store::open(&runtime).unwrap();
        assert!(names(&replayed).is_empty(), "the removal came last");

        // Numbered, then the snapshot (holding it) is written and empties its journal; the line
        // arrives there only afterwards.
        let late = store.record(&uuid_of("b2"), Some(owner("b2")));
        let pending = store.begin_snapshot().expect("a snapshot");
        assert!(store.record(&uuid_of("b2"), None).append());
        assert!(pending.write());
        store.snapshot_written();
        assert!(late.append());
        let (_, replayed) = Store::open(&runtime).unwrap();
        assert!(
            names(&replayed).is_empty(),
            "the late line is older than the snapshot and the removal: {:?}",
            names(&replayed)
        );
    }

    /// A line cut off part-way (a full file system) and ended with a newline is skipped; the
    /// lines around it replay.
    #[test]
    fn a_cut_off_line_costs_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        assert!(store.record(&uuid_of("a1"), Some(owner("a1"))).append());
        let journal = &journal_paths(&runtime)[0];
        let mut cut = std::fs::OpenOptions::new()
            .append(true)
            .open(journal)
            .unwrap();
        cut.write_all(br#"{"uuid":"7c9e6679-7425-40de-944b-e07fc1f90ab2","owner":{"vm""#)
            .unwrap();
        cut.write_all(b"\n").unwrap();
        assert!(store.record(&uuid_of("c3"), Some(owner("c3"))).append());
        let (_, replayed) = Store::open(&runtime).unwrap();
        assert_eq!(names(&replayed), vec!["a1", "c3"]);
    }

    /// A failed append forces a snapshot at the next change, and that snapshot clears it.
    #[test]
    fn a_failed_append_forces_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        let line = store.record(&uuid_of("a1"), Some(owner("a1")));
        assert!(!store.wants_snapshot(1));
        store.append_failed(line.seq());
        assert!(store.wants_snapshot(1));
        let pending = store.begin_snapshot().expect("a snapshot");
        let seq = pending.seq();
        assert!(pending.write());
        store.snapshot_written();
        store.snapshot_succeeded(seq);
        assert!(!store.wants_snapshot(1));
        let (_, replayed) = Store::open(&runtime).unwrap();
        assert_eq!(names(&replayed), vec!["a1"]);
    }

    /// A snapshot is taken from what the numbered lines say, not from the table: written, it
    /// replays to exactly what replaying the lines themselves gives (entries and versions).
    #[test]
    fn a_snapshot_holds_what_replaying_its_lines_gives() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let (mut store, _) = Store::open(&runtime).unwrap();
        let with = |name: &str, ino: u64, version: u64| {
            let mut o = owner(name);
            o.grants[0].0.ino = ino;
            o.grants[0].3 = version;
            o
        };
        for (name, ino, version) in [("a1", 2, 1), ("b2", 3, 1), ("a1", 3, 2), ("c3", 2, 4)] {
            assert!(store
                .record(&uuid_of(name), Some(with(name, ino, version)))
                .append());
        }
        assert!(store.record(&uuid_of("b2"), None).append());
        let (_, from_lines) = Store::open(&runtime).unwrap();
        let pending = store.begin_snapshot().expect("a snapshot");
        assert!(pending.write());
        store.snapshot_written();
        for path in journal_paths(&runtime) {
            std::fs::write(path, b"").unwrap();
        }
        let (_, from_snapshot) = Store::open(&runtime).unwrap();
        assert_eq!(from_snapshot.owners, from_lines.owners);
        assert_eq!(from_snapshot.versions, from_lines.versions);
        assert_eq!(names(&from_snapshot), vec!["a1", "c3"]);
        assert_eq!(
            from_snapshot.versions.len(),
            2,
            "{:?}",
            from_snapshot.versions
        );
    }
}
