//! Leases on MySQL and MariaDB, as on PostgreSQL (`postgres::lease`): a claim is the named lock
//! held by the connection that runs the load's transaction; its lease, in the claims table and
//! renewed while the load runs, lets another loader end a frozen holder's connection, which
//! rolls its transaction back and frees the lock.
//!
//! Only the connection that holds this file's lock right now is ended (`IS_USED_LOCK` names it),
//! and only if it is the connection the expired lease was taken for. Connection ids are never
//! reused while a server runs (they only grow), so that connection started before the claim.

use sqlx::AssertSqlSafe;

use super::MySqlSink;
use crate::sink::lease::Heartbeat;

impl MySqlSink {
    /// Records who holds the file (the connection of the load's transaction) and until when, and
    /// renews that every third of the lease while the load runs.
    pub(super) async fn hold_claim(&self, id: &str, connection: u64) -> Result<Heartbeat, sqlx::Error> {
        let micros = self.options.lease.as_micros() as i64;
        sqlx::query(AssertSqlSafe(format!(
            "REPLACE INTO {} (file_id, owner, connection_id, claimed_at, expires_at)
             VALUES (?, ?, ?, CURRENT_TIMESTAMP(6), CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND)",
            self.claims
        )))
        .bind(id)
        .bind(&self.options.owner)
        .bind(connection)
        .bind(micros)
        .execute(&self.pool)
        .await?;
        let renew = format!(
            "UPDATE {} SET expires_at = CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND
             WHERE file_id = ? AND connection_id = ?",
            self.claims
        );
        let (pool, id) = (self.pool.clone(), id.to_string());
        Ok(Heartbeat::start(self.options.lease / 3, move || {
            let (pool, id, renew) = (pool.clone(), id.clone(), renew.clone());
            async move {
                sqlx::query(AssertSqlSafe(renew))
                    .bind(micros)
                    .bind(id)
                    .bind(connection)
                    .execute(&pool)
                    .await
                    .map(|_| ())
            }
        }))
    }

    pub(super) async fn release_claim(&self, id: &str, connection: u64) {
        let released = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE file_id = ? AND connection_id = ?",
            self.claims
        )))
        .bind(id)
        .bind(connection)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::debug!(error.message = %e, "could not release the claim (it expires by itself)");
        }
    }

    /// The file's lock is held by another connection: if that connection's lease ran out (its
    /// loader is frozen or cut off), end it; its transaction rolls back and the file is free for
    /// the next tick.
    pub(super) async fn take_over_if_expired(&self, id: &str, lock: &str) -> Result<(), sqlx::Error> {
        let holder: Option<u64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT CAST(connection_id AS UNSIGNED) FROM {} WHERE file_id = ?
                 AND expires_at < CURRENT_TIMESTAMP(6) AND connection_id = IS_USED_LOCK(?)",
            self.claims
        )))
        .bind(id)
        .bind(lock)
        .fetch_optional(&self.pool)
        .await?;
        let Some(holder) = holder else { return Ok(()) };
        // KILL takes no placeholder; the id is a number read from the server.
        match sqlx::query(AssertSqlSafe(format!("KILL CONNECTION {holder}")))
            .execute(&self.pool)
            .await
        {
            Ok(_) => {
                tracing::warn!(
                    db.connection = holder,
                    "the claim's lease expired: ended the holder's connection; its transaction rolls back"
                );
                Ok(())
            }
            // ER_NO_SUCH_THREAD: it ended by itself in the meantime.
            Err(sqlx::Error::Database(e))
                if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|e| e.number() == 1094) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
