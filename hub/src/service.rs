//! `hub serve` as a service: tells the service manager (systemd's `Type=notify`, through
//! `$NOTIFY_SOCKET`) that the hub is ready once its port is bound and its store open, and when
//! it begins to stop; and turns SIGTERM or SIGINT into a stop, after a drain when one is
//! configured. Accepts no connection itself: `server` stops accepting once [`stop_requested`]
//! completes, and lets the requests in flight finish.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::MAX_DRAIN_SECS;
use crate::http::App;
use crate::server::SHUTDOWN_GRACE;

/// What the stop takes beyond the drain and the in-flight requests' grace: writing what was
/// accepted and closing the store.
const STOP_MARGIN: Duration = Duration::from_secs(10);

// The longest stop the hub asks for fits the 32 bits of microseconds systemd is told.
const _: () = assert!(
    (MAX_DRAIN_SECS + SHUTDOWN_GRACE.as_secs() + STOP_MARGIN.as_secs()) * 1_000_000 <= u32::MAX as u64
);

/// The signals that stop the hub. Installed before the hub says it is ready, so that a stop
/// asked for from then on is never missed.
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Tells the service manager that the hub serves, with `status` for `systemctl status`. Does
/// nothing when no service manager listens (no `$NOTIFY_SOCKET`).
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot tell the service manager {states:?}: {e}");
    }
}

/// Completes when the hub is to stop accepting connections: at the first SIGTERM or SIGINT
/// when `drain` is zero; otherwise once `drain` has passed since it — `/healthz` answering 503
/// meanwhile, every request still served — or at a second signal. Tells the service manager at
/// the first signal that the hub is stopping and how long that may take.
pub async fn stop_requested(app: App, drain: Duration, mut signals: StopSignals) {
    let first = signals.next().await;
    let draining = !drain.is_zero();
    if draining {
        app.start_draining();
    }
    let may_take = drain + SHUTDOWN_GRACE + STOP_MARGIN;
    let micros = u32::try_from(may_take.as_micros()).unwrap_or(u32::MAX);
    notify(&[NotifyState::Stopping, NotifyState::ExtendTimeoutUsec(micros)]);
    if !draining {
        return;
    }
    tracing::info!(
        "{first}: draining for {drain:?}: /healthz answers 503 and requests are still served; \
         a second SIGTERM or SIGINT stops at once"
    );
    tokio::select! {
        () = tokio::time::sleep(drain) => tracing::info!("drained"),
        second = signals.next() => tracing::info!("{second}: stopping before the drain's end"),
    }
}
