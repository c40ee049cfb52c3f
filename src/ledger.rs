//! relocator's own schema, `relocator`: creating and upgrading it (`sql/ledger.sql`),
//! whether it exists, and the multipart uploads relocator started. The statements each
//! stage sends on the ledger stand with that stage (the one-statement commit in
//! [`crate::db::Queries`], leases in [`crate::pipeline::lease`], cleanups in
//! [`crate::pipeline::cleanup`], the `--referenced-by` columns a table's runs recorded
//! with the table's introspection in [`crate::db`]).

use anyhow::{Context, Result};
use deadpool_postgres::Pool;

use crate::config::config_error;
use crate::db::{pg_message, rt, session_lost};

/// The ledger's DDL, applied idempotently on first use.
const LEDGER_SQL: &str = include_str!("../sql/ledger.sql");

/// Apply the ledger DDL once; concurrent workers serialise on an advisory lock.
pub async fn ensure(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await?;
    apply(&tx).await?;
    tx.commit().await.context("committing the ledger schema")?;
    Ok(())
}

/// The ledger DDL inside `tx` (preflight applies it and rolls back: a dry run of the
/// privileges it needs).
pub async fn apply(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('relocator.ledger'));
         SET LOCAL client_min_messages = warning;",
    )
    .await?;
    // The ledger's DDL (ALTER TABLE … IF NOT EXISTS included) takes ACCESS EXCLUSIVE
    // locks on the ledger's tables even when there is nothing to change: a process
    // joining a live run would queue behind the other workers' open commits, and their
    // next statements behind it. So the DDL runs only when the schema's comment does not
    // name this version of it.
    let version = format!("relocator ledger {}", version());
    let found: Option<Option<String>> = tx
        .query_opt(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace
              WHERE nspname = 'relocator'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    if found.as_ref().and_then(|c| c.as_deref()) == Some(version.as_str()) {
        return Ok(());
    }
    let have_schema = found.is_some();
    let ddl = if have_schema {
        // The schema may have been created by an administrator (sql/roles.sql) for a role
        // that may not CREATE SCHEMA; skip that statement then.
        LEDGER_SQL.replace("CREATE SCHEMA IF NOT EXISTS relocator;", "")
    } else {
        LEDGER_SQL.to_owned()
    };
    tx.batch_execute(&ddl).await.map_err(|e| {
        if session_lost(&e) {
            return anyhow::anyhow!(
                "PostgreSQL ended the session while the ledger was set up: {e}; rerun"
            );
        }
        config_error(format!(
            "cannot create relocator's ledger (schema \"relocator\"): {}. Let an administrator \
             run sql/roles.sql, or grant this role CREATE on the database",
            pg_message(&e)
        ))
    })?;
    tx.batch_execute(&format!("COMMENT ON SCHEMA relocator IS '{version}'"))
        .await
        .context("recording the ledger's version")?;
    Ok(())
}

/// A digest of the ledger's DDL: a changed `sql/ledger.sql` is applied again.
fn version() -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(LEDGER_SQL.as_bytes())[..8])
}

/// Whether the ledger exists (plan reads it if so, and never creates it).
pub async fn exists(client: &tokio_postgres::Client) -> Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass('relocator.moves') IS NOT NULL", &[])
        .await?
        .get(0))
}

/// The multipart uploads relocator started, noted in its ledger (`relocator.uploads`).
pub struct UploadNotes(pub Pool);

impl UploadNotes {
    async fn exec(&self, sql: &str, bucket: &str, key: &str, id: &str) -> Result<()> {
        let c = self.0.get().await.context("connecting to note an upload")?;
        rt(1);
        c.execute(sql, &[&bucket, &key, &id])
            .await
            .context("noting relocator's multipart upload in the ledger")?;
        Ok(())
    }
}

impl crate::s3::Uploads for UploadNotes {
    fn started<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        id: &'a str,
    ) -> crate::s3::BoxFuture<'a> {
        Box::pin(self.exec(
            "INSERT INTO relocator.uploads (bucket, key, upload_id) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            bucket,
            key,
            id,
        ))
    }

    fn ended<'a>(&'a self, bucket: &'a str, key: &'a str, id: &'a str) -> crate::s3::BoxFuture<'a> {
        Box::pin(self.exec(
            "DELETE FROM relocator.uploads WHERE bucket = $1 AND key = $2 AND upload_id = $3",
            bucket,
            key,
            id,
        ))
    }

    fn ours<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let c = self.0.get().await.context("connecting to read uploads")?;
            rt(1);
            Ok(c.query(
                "SELECT upload_id FROM relocator.uploads WHERE bucket = $1 AND key = $2",
                &[&bucket, &key],
            )
            .await
            .context("reading relocator's multipart uploads from the ledger")?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
        })
    }
}
