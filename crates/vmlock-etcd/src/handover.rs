//! Migration between hosts, with no window: the destination's keys are created **beside** the
//! source's, fenced by the source's revisions and its hand-over secret, and the source's go only
//! when it finishes. While both exist, a third host is refused (an exclusive acquire needs the
//! disk to have no key at all); if either host dies meanwhile, the other's keys still hold the
//! disk.
//!
//! 1. Source, `prepare_handover`: checks its keys are still its own and writes
//!    `PREFIX/handover/<vm>` = SHA-256 of the secret, under its lease, in one transaction; returns
//!    each key's mod revision (the fencing tokens that travel in the lock state).
//! 2. Destination, `acquire_incoming`: one transaction that compares the hand-over key's value and
//!    every source key's mod revision, and creates the destination's keys under its own lease.
//!    A state that is not the current one (a key re-created or moved since, another prepare) is
//!    [`Error::Stale`]; a wrong secret is [`Error::Stale`] on the hand-over key.
//! 3. Source, `end_handover`: deletes the hand-over key (the source's own keys are released as
//!    its grants end, as any release).

use crate::keys::{self, encode};
use crate::locks::{gets, header_revision, owner_json};
use crate::{Error, HostLease, LockKey, LockRequest, Revision};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

/// `PREFIX/handover/<vm>`.
fn handover_key(prefix: &str, vm: &str) -> String {
    format!("{prefix}/handover/{}", encode(vm))
}

/// A source key the destination's keys are fenced by: the key, whether exclusive, the revision
/// the source's lock state carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceKey {
    /// The source's lock.
    pub key: LockKey,
    /// Whether it is exclusive.
    pub exclusive: bool,
    /// Its mod revision at the source's prepare.
    pub revision: Revision,
}

impl HostLease {
    /// Source side: checks every key of `locks` is attached to this lease and writes VM `vm`'s
    /// hand-over key (`secret_hash`) under it, in one transaction. Returns each key's mod
    /// revision, in order.
    pub fn prepare_handover(
        &self,
        vm: &str,
        secret_hash: &str,
        locks: &[(LockKey, bool)],
    ) -> Result<Vec<Revision>, Error> {
        self.check()?;
        let prefix = self.etcd.config().prefix.clone();
        let mut compares = Vec::new();
        let mut reads = Vec::new();
        for (k, exclusive) in locks {
            k.validate()?;
            let key = keys::key(&prefix, k, *exclusive);
            compares.push(Compare::lease(key.clone(), CompareOp::Equal, self.id().0));
            reads.push(TxnOp::get(key, None));
        }
        let mut success = vec![TxnOp::put(
            handover_key(&prefix, vm),
            secret_hash,
            Some(PutOptions::new().with_lease(self.id().0)),
        )];
        success.extend(reads.iter().cloned());
        let txn = Txn::new().when(compares).and_then(success).or_else(reads);
        let resp = self.etcd.txn("prepare hand-over", txn)?;
        let responses = resp.op_responses();
        // On success the hand-over put comes first and answers no get.
        let skip = usize::from(resp.succeeded());
        let found: Vec<Option<&etcd_client::KeyValue>> =
            gets(&responses).skip(skip).map(|kvs| kvs.first()).collect();
        if !resp.succeeded() {
            // The first key that is not (or no longer) this lease's.
            let lost = locks
                .iter()
                .zip(&found)
                .find(|(_, kv)| !kv.is_some_and(|kv| kv.lease() == self.id().0));
            let (k, kv) = lost.map_or((&locks[0].0, None), |((k, _), kv)| (k, *kv));
            return Err(Error::Stale {
                key: k.clone(),
                expected: Revision(0),
                current: kv.map(|kv| Revision(kv.mod_revision())),
            });
        }
        Ok(found
            .into_iter()
            .map(|kv| kv.map_or(Revision(0), |kv| Revision(kv.mod_revision())))
            .collect())
    }

    /// Destination side: creates `requests`' keys under this lease in one transaction, only if
    /// VM `vm`'s hand-over key still holds `secret_hash` and every source key is at its
    /// revision. A retry after a lost reply finds its own keys and is that success.
    pub fn acquire_incoming(
        &self,
        vm: &str,
        secret_hash: &str,
        sources: &[SourceKey],
        requests: &[LockRequest],
    ) -> Result<Revision, Error> {
        self.check()?;
        if sources.is_empty() || requests.is_empty() {
            return Err(Error::Invalid("a hand-over names no lock".into()));
        }
        let prefix = self.etcd.config().prefix.clone();
        let handover = handover_key(&prefix, vm);
        let mut compares = vec![Compare::value(
            handover.clone(),
            CompareOp::Equal,
            secret_hash,
        )];
        let mut reads = vec![TxnOp::get(handover.clone(), None)];
        for s in sources {
            s.key.validate()?;
            let key = keys::key(&prefix, &s.key, s.exclusive);
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                s.revision.0,
            ));
            reads.push(TxnOp::get(key, None));
        }
        let mut puts = Vec::new();
        for r in requests {
            r.key.validate()?;
            let own = keys::key(&prefix, &r.key, r.exclusive);
            compares.push(Compare::create_revision(own.clone(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(
                own.clone(),
                owner_json(&r.owner),
                Some(PutOptions::new().with_lease(self.id().0)),
            ));
            reads.push(TxnOp::get(own, None));
        }
        let txn = Txn::new().when(compares).and_then(puts).or_else(reads);
        let resp = self.etcd.txn("acquire incoming", txn)?;
        if resp.succeeded() {
            return Ok(header_revision(resp.header()));
        }
        let responses = resp.op_responses();
        let kvs: Vec<Option<&etcd_client::KeyValue>> =
            gets(&responses).map(|kvs| kvs.first()).collect();
        // Our own keys already there, all of them: an earlier try succeeded.
        let own = &kvs[1 + sources.len()..];
        let mine = |r: &LockRequest, kv: &Option<&etcd_client::KeyValue>| {
            kv.is_some_and(|kv| {
                kv.lease() == self.id().0 && kv.value() == owner_json(&r.owner).as_bytes()
            })
        };
        if requests.iter().zip(own).all(|(r, kv)| mine(r, kv)) {
            return Ok(Revision(
                own.iter()
                    .flatten()
                    .map(|kv| kv.mod_revision())
                    .max()
                    .unwrap_or(0),
            ));
        }
        if !kvs[0].is_some_and(|kv| kv.value() == secret_hash.as_bytes()) {
            return Err(Error::Stale {
                key: LockKey::new("hand-over", vm),
                expected: Revision(0),
                current: kvs[0].map(|kv| Revision(kv.mod_revision())),
            });
        }
        for (s, kv) in sources.iter().zip(&kvs[1..]) {
            let current = kv.map(|kv| Revision(kv.mod_revision()));
            if current != Some(s.revision) {
                return Err(Error::Stale {
                    key: s.key.clone(),
                    expected: s.revision,
                    current,
                });
            }
        }
        Err(Error::Request {
            what: "acquire incoming",
            endpoints: self.etcd.config().endpoints_text(),
            reason: "the destination already holds a lock it was asked to create".into(),
            timed_out: false,
        })
    }

    /// Source side: deletes VM `vm`'s hand-over key if this lease wrote it.
    pub fn end_handover(&self, vm: &str) -> Result<(), Error> {
        let prefix = self.etcd.config().prefix.clone();
        let key = handover_key(&prefix, vm);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, self.id().0)])
            .and_then([TxnOp::delete(key, None)]);
        self.etcd.txn("end hand-over", txn).map(drop)
    }
}
