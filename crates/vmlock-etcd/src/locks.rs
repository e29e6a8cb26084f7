//! Lock operations, one etcd transaction each, all or nothing.
//!
//! - acquire: per request, compares that nothing conflicts (exclusive: no key under the disk's
//!   prefix; shared: no key under its `e/` and not its own key), then puts every key with the
//!   host's lease; on failure the same transaction reads each disk's keys so the refusal names
//!   the holder.
//! - release: one transaction of nested ones, each deleting a key only if it is attached to
//!   this host's lease (a key that moved to another host by a transfer is left alone).
//! - transfer: compares the key's mod revision with the caller's, then re-puts it with the
//!   destination's lease and value.
//!
//! Requests that fail on transport are retried; acquire and transfer recognise their own
//! earlier success (a reply lost on a dying member) from what the failure branch read.

use crate::keys::{self, LockKey};
use crate::{Error, Etcd, HostLease, LeaseId, Revision};
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

/// Who holds a lock: the value of its key, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The host's name.
    pub host: String,
    /// The VM's name.
    pub vm_name: String,
    /// The VM's uuid.
    pub vm_uuid: String,
    /// The guest's pid on its host, once known.
    #[serde(default)]
    pub pid: Option<u32>,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {} (uuid {}", self.vm_name, self.vm_uuid)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        write!(f, ") on host {}", self.host)
    }
}

/// One lock asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    /// Disk and holder.
    pub key: LockKey,
    /// Exclusive (one writer) or shared.
    pub exclusive: bool,
    /// The owner written as the key's value.
    pub owner: Owner,
}

/// A lock as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Disk and holder.
    pub key: LockKey,
    /// Exclusive or shared.
    pub exclusive: bool,
    /// The owner.
    pub owner: Owner,
    /// The key's mod revision (the fencing token a transfer names).
    pub revision: Revision,
    /// The lease it is attached to.
    pub lease: LeaseId,
}

/// The result of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The revision of the release transaction.
    pub revision: Revision,
    /// Keys that were not attached to this lease (absent, or moved away): left alone.
    pub not_held: Vec<LockKey>,
}

pub(crate) fn owner_json(owner: &Owner) -> String {
    // A struct of strings and an integer: serialisation cannot fail.
    serde_json::to_string(owner).unwrap_or_default()
}

fn parse_held(prefix: &str, kv: &KeyValue) -> Result<Held, Error> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let corrupt = || Error::Corrupt {
        key: key.clone(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
    };
    let (lock, exclusive) = keys::parse(prefix, &key).ok_or_else(corrupt)?;
    let owner: Owner = serde_json::from_slice(kv.value()).map_err(|_| corrupt())?;
    Ok(Held {
        key: lock,
        exclusive,
        owner,
        revision: Revision(kv.mod_revision()),
        lease: LeaseId(kv.lease()),
    })
}

pub(crate) fn gets(responses: &[TxnOpResponse]) -> impl Iterator<Item = &[KeyValue]> {
    responses.iter().map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs(),
        _ => &[],
    })
}

pub(crate) fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    Revision(h.map_or(0, |h| h.revision()))
}

impl Etcd {
    /// Every lock of `disk`.
    pub fn holders(&self, disk: &str) -> Result<Vec<Held>, Error> {
        let prefix = self.config().prefix.clone();
        let p = keys::disk_prefix(&prefix, disk);
        let resp = self.get_prefix(&p)?;
        resp.kvs()
            .iter()
            .map(|kv| parse_held(&prefix, kv))
            .collect()
    }

    /// Every lock attached to `lease` (what a daemon that takes its lease over still holds).
    pub fn held_by(&self, lease: LeaseId) -> Result<Vec<Held>, Error> {
        let prefix = self.config().prefix.clone();
        let p = format!("{prefix}/disks/");
        let resp = self.get_prefix(&p)?;
        let mut held = Vec::new();
        for kv in resp.kvs().iter().filter(|kv| kv.lease() == lease.0) {
            held.push(parse_held(&prefix, kv)?);
        }
        Ok(held)
    }

    /// Takes every lock of `requests` under `lease` in one transaction, or none. The revision
    /// returned is each new key's revision (its fencing token). A refusal is
    /// [`Error::Conflict`] naming the first conflicting holder. Asking again for locks this
    /// lease already holds with the same owners succeeds with their revision (so a retry after
    /// a lost reply is harmless).
    pub fn acquire(&self, lease: LeaseId, requests: &[LockRequest]) -> Result<Revision, Error> {
        if requests.is_empty() {
            return Err(Error::Invalid("no lock asked for".into()));
        }
        let mut disks = std::collections::HashSet::new();
        for r in requests {
            r.key.validate()?;
            if !disks.insert(r.key.disk.as_str()) {
                return Err(Error::Invalid(format!(
                    "disk {:?} asked for twice in one request",
                    r.key.disk
                )));
            }
        }
        let prefix = self.config().prefix.clone();
        let mut compares = Vec::new();
        let mut puts = Vec::new();
        let mut reads = Vec::new();
        for r in requests {
            let own = keys::key(&prefix, &r.key, r.exclusive);
            let disk = keys::disk_prefix(&prefix, &r.key.disk);
            if r.exclusive {
                compares.push(
                    Compare::create_revision(disk.clone(), CompareOp::Equal, 0).with_prefix(),
                );
            } else {
                let excl = keys::exclusive_prefix(&prefix, &r.key.disk);
                compares.push(Compare::create_revision(excl, CompareOp::Equal, 0).with_prefix());
                compares.push(Compare::create_revision(own.clone(), CompareOp::Equal, 0));
            }
            puts.push(TxnOp::put(
                own,
                owner_json(&r.owner),
                Some(PutOptions::new().with_lease(lease.0)),
            ));
            reads.push(TxnOp::get(disk, Some(GetOptions::new().with_prefix())));
        }
        let txn = Txn::new().when(compares).and_then(puts).or_else(reads);
        let resp = self.txn("acquire", txn)?;
        if resp.succeeded() {
            return Ok(header_revision(resp.header()));
        }
        let responses = resp.op_responses();
        // Every conflict found: another holder is reported at once; our own key (this lease,
        // this owner) only if not every request found its own (a retry of a transaction that
        // succeeded finds all of them, and is that success).
        let mut all_mine = true;
        let mut first_own = None;
        for (r, kvs) in requests.iter().zip(gets(&responses)) {
            let own = keys::key(&prefix, &r.key, r.exclusive);
            let mut mine = false;
            for kv in kvs {
                let held = parse_held(&prefix, kv)?;
                let is_own = kv.key() == own.as_bytes();
                // A shared lock conflicts only with an exclusive one (or its own key).
                if !r.exclusive && !held.exclusive && !is_own {
                    continue;
                }
                let conflict = Error::Conflict {
                    key: r.key.clone(),
                    holder_key: String::from_utf8_lossy(kv.key()).into_owned(),
                    exclusive: held.exclusive,
                    holder: Box::new(held.owner.clone()),
                };
                if is_own && held.lease == lease && held.owner == r.owner {
                    mine = true;
                    first_own.get_or_insert((held.revision, conflict));
                } else {
                    return Err(conflict);
                }
            }
            all_mine &= mine;
        }
        match first_own {
            Some((revision, _)) if all_mine => Ok(revision),
            Some((_, conflict)) => Err(conflict),
            None => Err(Error::Request {
                what: "acquire",
                endpoints: self.config().endpoints_text(),
                reason: "the transaction failed but found no conflicting key".into(),
                timed_out: false,
            }),
        }
    }

    /// Deletes, in one transaction, every key of `locks` (exclusive or shared) that is attached
    /// to `lease`; others are reported in [`Released::not_held`] and left alone.
    pub fn release(&self, lease: LeaseId, locks: &[LockKey]) -> Result<Released, Error> {
        let prefix = self.config().prefix.clone();
        let mut ops = Vec::new();
        for k in locks {
            k.validate()?;
            for exclusive in [true, false] {
                let key = keys::key(&prefix, k, exclusive);
                ops.push(TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(key.clone(), CompareOp::Equal, lease.0)])
                        .and_then([TxnOp::delete(key, None)]),
                ));
            }
        }
        let txn = Txn::new().and_then(ops);
        let resp = self.txn("release", txn)?;
        let deleted: Vec<bool> = resp
            .op_responses()
            .iter()
            .map(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()))
            .collect();
        let not_held = locks
            .iter()
            .zip(deleted.chunks(2))
            .filter(|(_, d)| !d.iter().any(|&x| x))
            .map(|(k, _)| k.clone())
            .collect();
        Ok(Released {
            revision: header_revision(resp.header()),
            not_held,
        })
    }

    /// Moves one lock to `to_lease` with `new_owner` as its value, in one transaction that
    /// compares the key's mod revision with `from` (the source's fencing token): no window
    /// where nobody or both hold it, and a stale state is [`Error::Stale`]. Returns the key's
    /// new revision (the destination's token; the source's is stale from now on).
    pub fn transfer(
        &self,
        key: &LockKey,
        exclusive: bool,
        from: Revision,
        to_lease: LeaseId,
        new_owner: &Owner,
    ) -> Result<Revision, Error> {
        key.validate()?;
        let prefix = self.config().prefix.clone();
        let k = keys::key(&prefix, key, exclusive);
        let value = owner_json(new_owner);
        let txn = Txn::new()
            .when([Compare::mod_revision(k.clone(), CompareOp::Equal, from.0)])
            .and_then([TxnOp::put(
                k.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(to_lease.0)),
            )])
            .or_else([TxnOp::get(k.clone(), None)]);
        let resp = self.txn("transfer", txn)?;
        if resp.succeeded() {
            return Ok(header_revision(resp.header()));
        }
        let responses = resp.op_responses();
        let current = gets(&responses).next().and_then(|kvs| kvs.first());
        match current {
            // Our own earlier attempt succeeded and its reply was lost.
            Some(kv)
                if kv.lease() == to_lease.0
                    && kv.value() == value.as_bytes()
                    && kv.mod_revision() > from.0 =>
            {
                Ok(Revision(kv.mod_revision()))
            }
            _ => Err(Error::Stale {
                key: key.clone(),
                expected: from,
                current: current.map(|kv| Revision(kv.mod_revision())),
            }),
        }
    }
}

impl HostLease {
    /// [`Etcd::acquire`] under this lease; refused at once if the lease is lost or past its
    /// deadline.
    pub fn acquire(&self, requests: &[LockRequest]) -> Result<Revision, Error> {
        self.check()?;
        self.etcd.acquire(self.id(), requests)
    }

    /// [`Etcd::release`] of this lease's keys.
    pub fn release(&self, locks: &[LockKey]) -> Result<Released, Error> {
        self.etcd.release(self.id(), locks)
    }

    /// [`Etcd::transfer`] of a lock to this lease (the migration destination calls it with the
    /// source's revision).
    pub fn transfer(
        &self,
        key: &LockKey,
        exclusive: bool,
        from: Revision,
        new_owner: &Owner,
    ) -> Result<Revision, Error> {
        self.check()?;
        self.etcd
            .transfer(key, exclusive, from, self.id(), new_owner)
    }
}
