//! What the leases of PostgreSQL and MySQL/MariaDB share: a task that renews a claim's lease
//! while its load runs. Each database records and ends leases in its own SQL
//! (`postgres::lease`, `mysql::lease`).

use std::future::Future;
use std::time::Duration;

/// Keeps a claim's lease alive while its load runs; stops (and releases nothing) when dropped.
pub(crate) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    /// Runs `renew` every `period`, the first time one period from now.
    pub(crate) fn start<F, Fut>(period: Duration, renew: F) -> Heartbeat
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), sqlx::Error>> + Send,
    {
        Heartbeat(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if let Err(e) = renew().await {
                    tracing::warn!(error.message = %e, "could not renew the claim's lease");
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}
