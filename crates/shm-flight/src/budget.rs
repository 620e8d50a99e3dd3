//! What a server lets its callers make it hold: shared memory for arguments, reserved as their
//! data arrives, within a total and a per-connection budget.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::wire::WireError;

/// The bytes of arguments a server holds at once, in all and for one connection.
#[derive(Debug)]
pub(crate) struct Budget {
    total: u64,
    per_connection: u64,
    state: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: u64,
    by_connection: HashMap<Option<SocketAddr>, u64>,
}

impl Budget {
    pub(crate) fn new(total: u64, per_connection: u64) -> Arc<Self> {
        Arc::new(Budget {
            total,
            per_connection,
            state: Mutex::new(Held::default()),
        })
    }

    /// A reservation, empty so far, for a call that came on `connection`.
    pub(crate) fn reservation(self: &Arc<Self>, connection: Option<SocketAddr>) -> Reservation {
        Reservation {
            budget: Some(Arc::clone(self)),
            connection,
            held: AtomicU64::new(0),
        }
    }

    /// Whether `bytes` more fit for `connection` now; takes them if `take`.
    fn fit(&self, connection: Option<SocketAddr>, bytes: u64, take: bool) -> Result<(), WireError> {
        let mut held = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.by_connection.get(&connection).copied().unwrap_or(0);
        if mine.saturating_add(bytes) > self.per_connection {
            return Err(WireError::Busy(format!(
                "the arguments need {bytes} bytes of shared memory; this connection's calls \
                 hold {mine} of the {} bytes one connection may",
                self.per_connection
            )));
        }
        if held.total.saturating_add(bytes) > self.total {
            return Err(WireError::Busy(format!(
                "the arguments need {bytes} bytes of shared memory; calls hold {} of the \
                 server's {} bytes",
                held.total, self.total
            )));
        }
        if take && bytes > 0 {
            held.total += bytes;
            *held.by_connection.entry(connection).or_default() += bytes;
        }
        Ok(())
    }

    fn give_back(&self, connection: Option<SocketAddr>, bytes: u64) {
        let mut held = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(bytes);
        if let Some(mine) = held.by_connection.get_mut(&connection) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                held.by_connection.remove(&connection);
            }
        }
    }
}

/// The shared memory one call holds against its server's budget; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    /// `None` for a receiver that bounds nothing but the payload's size (a client reading
    /// its result).
    budget: Option<Arc<Budget>>,
    connection: Option<SocketAddr>,
    held: AtomicU64,
}

impl Reservation {
    /// A reservation that never refuses.
    pub(crate) fn unlimited() -> Self {
        Reservation {
            budget: None,
            connection: None,
            held: AtomicU64::new(0),
        }
    }

    /// Refuses, without taking anything, if `bytes` do not fit now.
    pub(crate) fn check(&self, bytes: u64) -> Result<(), WireError> {
        match &self.budget {
            Some(budget) => budget.fit(self.connection, bytes, false),
            None => Ok(()),
        }
    }

    /// Takes `bytes` more, or refuses.
    pub(crate) fn charge(&self, bytes: u64) -> Result<(), WireError> {
        if let Some(budget) = &self.budget {
            budget.fit(self.connection, bytes, true)?;
            self.held.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(self.connection, *self.held.get_mut());
        }
    }
}
