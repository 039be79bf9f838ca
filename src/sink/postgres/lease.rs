//! Leases: who holds which file, until when. A claim is the load transaction's advisory lock;
//! its lease, renewed while the load runs, lets another loader end a frozen holder's session.

use sqlx::AssertSqlSafe;

use super::PgSink;
use crate::sink::lease::Heartbeat;

/// The advisory lock key of a file: the first 64 bits of its id.
pub(super) fn lock_key(id: &str) -> i64 {
    u64::from_str_radix(&id[..16], 16).unwrap_or(0) as i64
}

impl PgSink {
    /// Records who holds the files (the load transaction's server process) and until when, in
    /// one statement, and renews that every third of the lease while the load runs.
    pub(super) async fn hold_claims(&self, ids: &[String], pid: i32) -> Result<Heartbeat, sqlx::Error> {
        let lease = self.options.lease.as_secs_f64();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (file_id, owner, backend_pid, claimed_at, expires_at)
             SELECT id, $2, $3, now(), now() + make_interval(secs => $4) FROM unnest($1::text[]) AS id
             ON CONFLICT (file_id) DO UPDATE SET owner = excluded.owner, backend_pid = excluded.backend_pid,
                 claimed_at = excluded.claimed_at, expires_at = excluded.expires_at",
            self.claims
        )))
        .bind(ids)
        .bind(&self.options.owner)
        .bind(pid)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        let renew = format!(
            "UPDATE {} SET expires_at = now() + make_interval(secs => $3)
             WHERE file_id = ANY($1) AND backend_pid = $2",
            self.claims
        );
        let (pool, ids) = (self.pool.clone(), ids.to_vec());
        Ok(Heartbeat::start(self.options.lease / 3, move || {
            let (pool, ids, renew) = (pool.clone(), ids.clone(), renew.clone());
            async move {
                sqlx::query(AssertSqlSafe(renew))
                    .bind(ids)
                    .bind(pid)
                    .bind(lease)
                    .execute(&pool)
                    .await
                    .map(|_| ())
            }
        }))
    }

    /// Ends the leases of `ids` held by the session `pid`, in one statement.
    pub(super) async fn release_claims(&self, ids: &[String], pid: i32) {
        let released = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE file_id = ANY($1) AND backend_pid = $2",
            self.claims
        )))
        .bind(ids)
        .bind(pid)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::debug!(error.message = %e, "could not release the claims (they expire by themselves)");
        }
    }

    /// The file is locked by another load: if that load's lease ran out (its process is frozen
    /// or cut off), end its server session, which rolls its transaction back and frees the
    /// file for the next tick. Only the session that holds this file's lock right now is
    /// ended, and only if it started before the claim (so the process id is still its own).
    pub(super) async fn take_over_if_expired(&self, id: &str) -> Result<(), sqlx::Error> {
        let key = lock_key(id);
        let ended: Vec<(bool,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT pg_terminate_backend(a.pid) FROM {} c
             JOIN pg_stat_activity a ON a.pid = c.backend_pid
             JOIN pg_locks l ON l.pid = c.backend_pid AND l.locktype = 'advisory' AND l.granted
                 AND l.classid = (($2 >> 32) & 4294967295)::oid AND l.objid = ($2 & 4294967295)::oid AND l.objsubid = 1
             WHERE c.file_id = $1 AND c.expires_at < now() AND a.backend_start <= c.claimed_at",
            self.claims
        )))
        .bind(id)
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        if ended.iter().any(|(done,)| *done) {
            tracing::warn!("the claim's lease expired: ended the holder's session; its transaction rolls back");
        }
        Ok(())
    }
}
