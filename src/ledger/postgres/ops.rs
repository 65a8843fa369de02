//! The ledger's operations on PostgreSQL, each one transaction, every daemon write fenced.
//!
//! Owns: the SQL of each operation ported so far (tracking a checkout, saving Listen resume
//! points), and [`PgStore::begin_write`], the one way a write transaction starts: on a daemon's
//! store it passes the fence with the epoch of the role the keeper publishes, and a standby's
//! write is refused before it reaches the database.
//! Must never: write from a daemon's store without the fence (the schema refuses that too), or
//! record a status that did not come from Get Checkout (tracking records none).
//!
//! Money crosses as exact decimal text (`CAST($n::TEXT AS NUMERIC)`), never as a float.

use deadpool_postgres::{Object, Transaction};

use super::{PgError, PgStore, fence};
use crate::domain::TrackedVia;
use crate::ledger::{ResumePoint, TrackOutcome};
use crate::paymennt::wire::CheckoutFacts;

impl PgStore {
    /// A pooled connection.
    async fn client(&self) -> Result<Object, PgError> {
        self.pool()
            .get()
            .await
            .map_err(|error| PgError::from_pool(self.target(), &error))
    }

    /// Starts a write transaction on `client`: on a daemon's store (one given the keeper's
    /// role, [`PgStore::with_role`]) it is fenced at the current epoch, and refused at once
    /// while standing by.
    ///
    /// # Errors
    ///
    /// [`PgError::Fenced`] while standing by or when the epoch is no longer current; database
    /// failures.
    pub async fn begin_write<'c>(
        &self,
        client: &'c mut Object,
    ) -> Result<Transaction<'c>, PgError> {
        let epoch = match self.role() {
            None => None,
            Some(role) => Some(role.borrow().epoch().ok_or_else(|| PgError::Fenced {
                target: self.target().describe().to_owned(),
                detail: "this daemon is standing by (it does not hold the lease)".to_owned(),
            })?),
        };
        let transaction = client
            .transaction()
            .await
            .map_err(|error| self.db(&error))?;
        if let Some(epoch) = epoch {
            fence(&transaction, self.target(), epoch).await?;
        }
        Ok(transaction)
    }

    fn db(&self, error: &tokio_postgres::Error) -> PgError {
        PgError::from_db(self.target(), error)
    }

    /// Records a checkout to watch; tracking it again changes nothing. The status in `facts`
    /// is not recorded (only a verified one is). Facts without Firebase coordinates are
    /// refused.
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`]; no coordinates; database failures.
    pub async fn track(
        &self,
        facts: &CheckoutFacts,
        via: TrackedVia,
    ) -> Result<TrackOutcome, PgError> {
        let Some(location) = &facts.location else {
            return Err(PgError::Database {
                target: self.target().describe().to_owned(),
                detail: format!(
                    "checkout {} has no Firebase coordinates to watch",
                    facts.id.as_str()
                ),
            });
        };
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let inserted = transaction
            .execute(
                "INSERT INTO checkouts (id, order_id, request_id, display_id, amount, currency,
                    status, total_refunded, redirect_url, firebase_database, firebase_collection,
                    firebase_document, watched, needs_verify, tracked_via, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, CAST($5::TEXT AS NUMERIC), $6, NULL,
                    CAST($7::TEXT AS NUMERIC), $8, $9, $10, $11, TRUE, TRUE, $12, now(), now())
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &facts.id.as_str(),
                    &facts.order_id,
                    &facts.request_id,
                    &facts.display_id,
                    &facts.amount.to_string(),
                    &facts.currency.as_str(),
                    &facts.total_refunded.map(|total| total.to_string()),
                    &facts.redirect_url,
                    &location.project.as_str(),
                    &location.collection.as_str(),
                    &location.document.as_str(),
                    &via.as_str(),
                ],
            )
            .await
            .map_err(|error| self.db(&error))?;
        transaction
            .commit()
            .await
            .map_err(|error| self.db(&error))?;
        Ok(if inserted == 1 {
            TrackOutcome::Added
        } else {
            TrackOutcome::AlreadyTracked
        })
    }

    /// Saves Listen resume tokens, for still-watched checkouts only, in one transaction, in
    /// order (a checkout's later token replaces its earlier one).
    ///
    /// # Errors
    ///
    /// As [`PgStore::begin_write`] (a paused daemon cannot move a cursor); database failures
    /// (then none of them is saved).
    pub async fn save_resume_points(&self, points: &[ResumePoint]) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let transaction = self.begin_write(&mut client).await?;
        let statement = transaction
            .prepare_cached(
                "INSERT INTO listen_targets (checkout_id, resume_token, read_time, updated_at)
                 SELECT id, $2, $3, now() FROM checkouts WHERE id = $1 AND watched
                 ON CONFLICT (checkout_id) DO UPDATE SET
                    resume_token = excluded.resume_token,
                    read_time = excluded.read_time,
                    updated_at = excluded.updated_at",
            )
            .await
            .map_err(|error| self.db(&error))?;
        for point in points {
            transaction
                .execute(
                    &statement,
                    &[&point.checkout_id.as_str(), &point.token, &point.read_time],
                )
                .await
                .map_err(|error| self.db(&error))?;
        }
        transaction.commit().await.map_err(|error| self.db(&error))
    }
}
