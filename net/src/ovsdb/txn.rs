//! A transaction under construction whose operations carry roles, so that a failed precondition (a `wait` that
//! timed out) is turned into what it means by the typed layers ([`crate::vswitch`], [`crate::ovn`]) in one way.

use uuid::Uuid;

use super::{Error, Operation, OperationResult};

/// Operations and, for each, why it is there (`R`, the caller's role type).
#[derive(Debug, Clone)]
pub struct Txn<R> {
    ops: Vec<Operation>,
    roles: Vec<R>,
}

impl<R> Default for Txn<R> {
    fn default() -> Self {
        Self { ops: Vec::new(), roles: Vec::new() }
    }
}

impl<R: Copy> Txn<R> {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `op` with its role; returns its index (where its result will be).
    pub fn push(&mut self, role: R, op: Operation) -> usize {
        self.ops.push(op);
        self.roles.push(role);
        self.ops.len() - 1
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// The role of operation `index`.
    pub fn role(&self, index: usize) -> Option<R> {
        self.roles.get(index).copied()
    }

    /// The roles with their indexes, in order.
    pub fn roles(&self) -> impl Iterator<Item = (usize, R)> + '_ {
        self.roles.iter().copied().enumerate()
    }

    /// The role of the precondition whose failure (`wait` timed out) made the transaction fail, if that is why.
    pub fn failed_role(&self, error: &Error) -> Option<R> {
        let (index, kind) = error.transaction_error()?;
        (kind == "timed out").then(|| self.role(index)).flatten()
    }
}

/// The uuid of the row that the `insert` at `index` created.
pub fn inserted_uuid(results: &[OperationResult], index: usize) -> Result<Uuid, Error> {
    results.get(index).and_then(|r| r.uuid).ok_or_else(|| Error::Decode {
        method: "transact".into(),
        reason: format!("operation {index} (an insert) returned no uuid"),
    })
}
