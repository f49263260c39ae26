//! The writes waiting for a store's writer threads: handed in one at a time by the hub's
//! tasks, taken a batch at a time by a writer, each answered once its batch is durable. A full
//! queue makes senders wait (backpressure); a closed one refuses new writes while its writers
//! finish the ones accepted.

use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::{StoreError, Write, WriteOutcome};

/// Where a write's outcome goes.
pub(super) type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

/// One write waiting, and where its outcome goes.
pub(super) struct Job {
    write: Write,
    reply: Reply,
}

/// The hub's side of the queue.
pub(super) struct Queue {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
}

/// Writes waiting at most; senders beyond them wait.
const CAPACITY: usize = 8192;

/// The writers' side of the queue.
pub(super) type Writes = mpsc::Receiver<Job>;

/// An empty queue.
pub(super) fn queue() -> (Queue, Writes) {
    let (sender, writes) = mpsc::channel(CAPACITY);
    (Queue { sender: Mutex::new(Some(sender)) }, writes)
}

impl Queue {
    fn sender(&self) -> Result<mpsc::Sender<Job>, StoreError> {
        self.sender.lock().expect("the store's queue").clone().ok_or(StoreError::Closed)
    }

    /// Hands `write` to the writers and waits for its outcome.
    pub(super) async fn write(&self, write: Write) -> Result<WriteOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Job { write, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Fails once the queue is closed, or its writers are gone.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        if self.sender()?.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Refuses new writes; the writers finish the ones waiting, then stop.
    pub(super) fn close(&self) {
        drop(self.sender.lock().expect("the store's queue").take());
    }
}

/// The next batch: waits for one write, then takes those already waiting, `max` at most;
/// `None` once the queue is closed and empty.
pub(super) fn next_batch(writes: &mut Writes, max: usize) -> Option<(Vec<Write>, Vec<Reply>)> {
    let first = writes.blocking_recv()?;
    let mut jobs = vec![first];
    while jobs.len() < max {
        match writes.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs.into_iter().map(|job| (job.write, job.reply)).unzip())
}
