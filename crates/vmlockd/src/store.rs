//! What survives a daemon restart: a snapshot (`state.json`) and a journal (`state.journal`) of
//! per-VM changes since it. Each change appends one line with the VM's whole entry (or its
//! removal), so a request costs one small write however many locks the host holds; the snapshot is
//! rewritten, and the journal emptied, once the journal outgrows the table.

use crate::runtime::RuntimeDir;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use vmlock_core::{Persisted, PersistedOwner};

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
struct Change {
    uuid: String,
    owner: Option<PersistedOwner>,
}

/// The snapshot and the journal.
#[derive(Debug)]
pub struct Store {
    runtime: RuntimeDir,
    journal: File,
    lines: usize,
}

impl Store {
    /// Opens the store and returns what it holds (snapshot with the journal replayed on top).
    /// Unreadable lines are skipped: the kernel still holds every lock, and holders hand their
    /// descriptions back, so a lost line only delays naming a holder.
    pub fn open(runtime: &RuntimeDir) -> std::io::Result<(Self, Persisted)> {
        let mut persisted = match std::fs::read(runtime.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(
                    "ignoring unreadable {}: {e}",
                    runtime.state_file().display()
                );
                Persisted::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        let path = runtime.state_file().with_extension("journal");
        let mut owners: BTreeMap<String, PersistedOwner> = persisted
            .owners
            .drain(..)
            .map(|o| (o.vm.uuid.clone(), o))
            .collect();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                match serde_json::from_str::<Change>(&line) {
                    Ok(Change {
                        uuid,
                        owner: Some(o),
                    }) => {
                        persisted.note_versions(&o);
                        owners.insert(uuid, o);
                    }
                    Ok(Change { uuid, owner: None }) => {
                        owners.remove(&uuid);
                    }
                    Err(e) => tracing::warn!("skipping a journal line of {}: {e}", path.display()),
                }
            }
        }
        persisted.owners = owners.into_values().collect();
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok((
            Store {
                runtime: runtime.clone(),
                journal,
                lines: 0,
            },
            persisted,
        ))
    }

    /// Records the new entry of VM `uuid` (`None`: it holds nothing any more).
    pub fn record(&mut self, uuid: &str, owner: Option<PersistedOwner>) {
        let mut line = match serde_json::to_vec(&Change {
            uuid: uuid.to_owned(),
            owner,
        }) {
            Ok(l) => l,
            Err(e) => return tracing::error!("encoding a journal line: {e}"),
        };
        line.push(b'\n');
        if let Err(e) = self.journal.write_all(&line) {
            tracing::error!("appending to the state journal: {e}");
        }
        self.lines += 1;
    }

    /// Whether the journal has outgrown a table of `owners` VMs.
    pub fn wants_snapshot(&self, owners: usize) -> bool {
        self.lines > 1024.max(owners * 4)
    }

    /// Writes a full snapshot, then empties the journal. A crash in between leaves journal lines
    /// that replay onto the new snapshot harmlessly (each line is a whole entry).
    pub fn snapshot(&mut self, full: &Persisted) {
        let path = self.runtime.state_file();
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(full)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                std::fs::rename(&tmp, &path)?;
                self.journal.set_len(0)
            });
        match result {
            Ok(()) => self.lines = 0,
            Err(e) => tracing::error!("writing {}: {e}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LinuxHost;
    use vmlock_core::{LockTable, Policy};
    use vmlock_sys::pidfd::ProcessHandle;

    #[test]
    fn journal_replays_on_the_snapshot_and_snapshots_empty_it() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = RuntimeDir::resolve(Some(dir.path())).unwrap();
        let me = std::process::id();
        let started = vmlock::process::stat(me).unwrap().start_time;
        let owner = |name: &str| -> PersistedOwner {
            serde_json::from_value(serde_json::json!({
                "vm": {"uuid": format!("7c9e6679-7425-40de-944b-e07fc1f90a{name}"), "name": name, "id": 1, "pid": me},
                "holder_pid": me, "start_time": started, "flags": {"register_only": false, "restrict": false, "on_lock_failure": "Poweroff"},
                "grants": [[{"dev": 1, "ino": 2, "byte": 0}, {"Disk": {"path": "/d", "mode": "Exclusive"}}, {"secs_since_epoch": 1, "nanos_since_epoch": 0}, 3]]
            }))
            .unwrap()
        };
        let (mut store, empty) = Store::open(&runtime).unwrap();
        assert!(empty.owners.is_empty());
        store.record("a", Some(owner("a1")));
        store.record("b", Some(owner("b2")));
        store.record("a", None);
        let (mut store, replayed) = Store::open(&runtime).unwrap();
        assert_eq!(replayed.owners.len(), 1);
        let mut table = LockTable::<LinuxHost>::new(Policy::default(), "h".into());
        let recovered = table.recover(replayed, |pid, start| {
            ProcessHandle::open(pid, Some(start)).ok()
        });
        assert_eq!(recovered, 1);
        store.snapshot(&table.persisted());
        assert_eq!(
            std::fs::metadata(runtime.state_file().with_extension("journal"))
                .unwrap()
                .len(),
            0
        );
        let (_, again) = Store::open(&runtime).unwrap();
        assert_eq!(again.owners.len(), 1);
    }
}
