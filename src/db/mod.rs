//! Thin PostgreSQL adapter: the pool, the table checked against the catalog, relocator's
//! ledger, and every SQL statement relocator sends (user identifiers always quoted and
//! checked against the catalog, values always bound).

pub mod tls;

use anyhow::{Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::config::{config_error, quote_ident, ColumnRef, DatabaseUrl, JobConfig};
use crate::reference::Reference;
use crate::s3::Side;

/// Round trips to PostgreSQL made by the job path (process-wide; for the summary and
/// the benchmark). Each statement relocator sends counts one.
pub static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count `n` round trips.
pub fn rt(n: u64) {
    ROUND_TRIPS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// The schema of relocator's ledger (see sql/ledger.sql); never a job's table.
pub const LEDGER_SCHEMA: &str = "relocator";

/// Connecting gives up after this unless DATABASE_URL sets `connect_timeout`.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A pool of at most `size` connections. `statement_timeout`: no statement of these
/// sessions may run longer (the job path; not the backup's COPY, which may take hours).
/// TCP keepalives notice a vanished server within about a minute.
pub fn pool(
    url: &DatabaseUrl,
    size: usize,
    statement_timeout: Option<std::time::Duration>,
) -> Result<Pool> {
    let mut cfg: tokio_postgres::Config = url
        .expose()
        .parse()
        .map_err(|e| config_error(format!("DATABASE_URL {url} is not valid: {e}")))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.keepalives_idle(std::time::Duration::from_secs(30));
    if let Some(t) = statement_timeout {
        let options = format!(
            "{} -c statement_timeout={}",
            cfg.get_options().unwrap_or(""),
            t.as_millis()
        );
        cfg.options(options.trim());
    }
    cfg.ssl_mode(url.tls.pg_mode());
    let mgr = Manager::from_config(
        cfg,
        url.tls.connector()?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(mgr).max_size(size.max(1));
    if let Some(sql) = url.session_sql {
        builder = builder.post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
            Box::pin(async move {
                client.batch_execute(sql).await.map_err(|e| {
                    deadpool_postgres::HookError::message(format!(
                        "preparing the session ({}): a temporary function needs the \
                         TEMPORARY privilege on the database",
                        pg_message(&e)
                    ))
                })
            })
        }));
    }
    builder.build().context("building the PostgreSQL pool")
}

/// The session was cut (terminated by an administrator, the server shutting down or
/// restarting, the connection closed): the run stops with exit 1 and a rerun resumes;
/// never reported as bad input.
pub fn session_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.code().is_some_and(|c| c.code().starts_with("57"))
}

/// First connection: a failure here is a configuration problem (exit 2), worded so.
pub async fn connect_checked(pool: &Pool, url: &DatabaseUrl) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|e| {
        if let deadpool_postgres::PoolError::Backend(be) = &e {
            if session_lost(be) {
                // Connected, then cut (a restart, an administrator): not bad input.
                return anyhow::anyhow!(
                    "PostgreSQL ended the session while connecting: {be}; rerun"
                );
            }
        }
        let inner = match &e {
            // The TLS error sits in the source chain: all of it, each with its cause.
            deadpool_postgres::PoolError::Backend(be) => {
                let mut chain = vec![be.to_string()];
                let mut cause = std::error::Error::source(be);
                while let Some(c) = cause {
                    chain.push(format!("{c} ({c:?})"));
                    cause = c.source();
                }
                crate::config::scrub(&chain.join(": "), url.expose())
            }
            other => other.to_string(),
        };
        if let Some(why) = url.tls.explain(&inner) {
            return config_error(format!("cannot connect to PostgreSQL at {url}: {why}"));
        }
        config_error(format!(
            "cannot connect to PostgreSQL at {url}: {inner}. Check --database-url / DATABASE_URL \
             and that the server is running (locally: scripts/stack.sh up)"
        ))
    })
}

/// The table as found in the catalog, with ready-quoted identifiers.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// `"schema"."table"`, quoted.
    pub qualified: String,
    /// Human form for reports and the ledger: schema.table, unquoted.
    pub display: String,
    pub id_col: String,
    pub path_col: String,
    /// Further `--path-column`s, quoted.
    pub more_cols: Vec<String>,
    /// The id column's type as SQL (from a fixed allow-list, never from input).
    pub id_type: &'static str,
    /// Whether an index leads with the path column (reference checks are then cheap).
    pub path_indexed: bool,
    /// `--referenced-by`, and the columns earlier processes of this job were given.
    pub referencing: Vec<Referencing>,
    /// Which keys the database can hold (its encoding).
    pub held_keys: crate::s3::HeldKeys,
    /// What the path column accepts, checked before any copy
    /// ([`crate::pipeline::limits`]).
    pub limits: ColumnLimits,
    /// How a row points at its object: the SQL every statement on the table takes its
    /// conditions on the reference from.
    pub reference: Reference,
    /// `--checksum-column`, quoted.
    pub checksum_col: Option<String>,
}

/// What the path column accepts beyond its type: a declared length (`varchar(100)`,
/// Django's default) and the table's CHECK constraints that read it.
#[derive(Debug, Clone, Default)]
pub struct ColumnLimits {
    /// The declared length in characters, and the type as the catalog spells it.
    pub max_chars: Option<(usize, String)>,
    /// With several `--path-column`s: each one's declared length (as `max_chars`), for
    /// the key it gets. `max_chars` and `checks` are empty then.
    pub by_column: Vec<(String, (usize, String))>,
    /// The CHECK constraints that read the path column.
    pub checks: Vec<Check>,
    /// The column's type without its length (`text`, `character varying`): a new value
    /// is tried against the checks as this type, so no cast truncates it first.
    pub base_type: String,
    /// The column's collation, qualified and quoted: a new value is tried against the
    /// checks with it, as the column compares.
    pub collation: Option<String>,
    /// The database is SQL_ASCII: `varchar(n)` counts bytes there.
    pub counts_bytes: bool,
}

/// One CHECK constraint on the path column.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub expr: String,
    /// The other columns the expression reads, quoted.
    pub columns: Vec<String>,
}

/// Another table's column whose values reference the same objects.
#[derive(Debug, Clone)]
pub struct Referencing {
    /// schema.table, quoted.
    pub qualified: String,
    /// The column, quoted.
    pub column: String,
    /// SCHEMA.TABLE.COLUMN, quoted: how the ledger remembers it.
    pub name: String,
    /// Whether an index leads with the column (a reference check is then cheap).
    pub indexed: bool,
}

/// Id types relocator can page through and cast from text.
fn id_type_sql(pg_type: &str) -> Option<&'static str> {
    match pg_type {
        "integer" => Some("integer"),
        "bigint" => Some("bigint"),
        "smallint" => Some("smallint"),
        "uuid" => Some("uuid"),
        "text" => Some("text"),
        t if t.starts_with("character varying") => Some("text"),
        _ => None,
    }
}

impl TableInfo {
    /// Resolve `--table`, `--id-column`, `--path-column` against the catalog. Every
    /// mismatch is a [`crate::config::ConfigError`] naming the fix.
    pub async fn resolve(client: &tokio_postgres::Client, cfg: &JobConfig) -> Result<TableInfo> {
        let t = &cfg.table;
        let row = client
            .query_opt(
                "SELECT c.oid, n.nspname, c.relname
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relname = $1
                    AND c.relkind IN ('r', 'p')
                    AND CASE WHEN $2::text IS NULL
                             THEN n.nspname = ANY (current_schemas(false))
                             ELSE n.nspname = $2::text END
                  ORDER BY array_position(current_schemas(false), n.nspname::text)
                  LIMIT 1",
                &[&t.name, &t.schema],
            )
            .await
            .context("looking up the table in the catalog")?;
        let Some(row) = row else {
            return Err(config_error(format!(
                "table {t} does not exist (or this role cannot see it){}; check --table",
                if t.schema.is_none() {
                    " in the search_path"
                } else {
                    ""
                }
            )));
        };
        let oid: u32 = row.get(0);
        let schema: String = row.get(1);
        let name: String = row.get(2);
        let display = format!("{schema}.{name}");
        // A role named like the ledger's schema finds it first through "$user" in the
        // default search_path: an unqualified --table moves would be relocator's own.
        if schema == LEDGER_SCHEMA {
            return Err(config_error(format!(
                "--table {t} resolves to {display}, relocator's own ledger{}; name the \
                 application's table with its schema (e.g. --table public.{name})",
                if t.schema.is_none() {
                    " (the role's search_path finds the schema \"relocator\" first, as \
                     \"$user\" does for a role named relocator)"
                } else {
                    ""
                }
            )));
        }

        let column = |col: &str| {
            let col = col.to_owned();
            async move {
                client
                    .query_opt(
                        "SELECT a.attnum, format_type(a.atttypid, a.atttypmod),
                                c.collname::text, coalesce(c.collisdeterministic, true)
                           FROM pg_attribute a
                           LEFT JOIN pg_collation c ON c.oid = a.attcollation
                          WHERE a.attrelid = $1 AND a.attname = $2
                            AND a.attnum > 0 AND NOT a.attisdropped",
                        &[&oid, &col],
                    )
                    .await
            }
        };
        let id = column(&cfg.id_column).await?.ok_or_else(|| {
            config_error(format!(
                "table {display} has no column {:?}; check --id-column",
                cfg.id_column
            ))
        })?;
        let path = column(&cfg.path_column).await?.ok_or_else(|| {
            config_error(format!(
                "table {display} has no column {:?}; check --path-column",
                cfg.path_column
            ))
        })?;
        let id_attnum: i16 = id.get(0);
        let id_pg_type: String = id.get(1);
        let path_attnum: i16 = path.get(0);
        let path_pg_type: String = path.get(1);
        let id_type = id_type_sql(&id_pg_type).ok_or_else(|| {
            config_error(format!(
                "--id-column {:?} is of type {id_pg_type}; relocator pages through integer, \
                 bigint, uuid or text keys. Name such a unique column with --id-column",
                cfg.id_column
            ))
        })?;
        let textual = path_pg_type == "text" || path_pg_type.starts_with("character varying");
        let document = path_pg_type == "json" || path_pg_type == "jsonb";
        match (cfg.json.is_some(), textual, document) {
            (false, true, _) | (true, _, true) | (true, true, _) => {}
            (false, _, true) => {
                return Err(config_error(format!(
                    "--path-column {:?} is of type {path_pg_type}: give --json-key with the \
                     field(s) of the document that hold keys (e.g. --json-key id)",
                    cfg.path_column
                )))
            }
            _ => {
                return Err(config_error(format!(
                    "--path-column {:?} is of type {path_pg_type}; it must be text or varchar \
                     (or json/jsonb with --json-key)",
                    cfg.path_column
                )))
            }
        }
        if let Some(svc) = &cfg.service {
            let found = column(&svc.column).await?.ok_or_else(|| {
                config_error(format!(
                    "table {display} has no column {:?}; check --service-column",
                    svc.column
                ))
            })?;
            let ty: String = found.get(1);
            if !(ty == "text" || ty.starts_with("character varying")) {
                return Err(config_error(format!(
                    "--service-column {:?} is of type {ty}; it must be text or varchar",
                    svc.column
                )));
            }
            // As for the path column: under a nondeterministic collation `legacy` would
            // select (and guard) `Legacy` rows too, another service's.
            if !found.get::<_, bool>(3) {
                return Err(config_error(format!(
                    "--service-column {:?} uses the nondeterministic collation {:?}, under \
                     which different services compare equal; give the column a \
                     deterministic collation (e.g. \"C\") first",
                    svc.column,
                    found.get::<_, Option<String>>(2).unwrap_or_default()
                )));
            }
        }
        // Each --path-column's attnum, for its declared length.
        let mut attnums = vec![(cfg.path_column.clone(), path_attnum)];
        for c in &cfg.more_columns {
            let found = column(c).await?.ok_or_else(|| {
                config_error(format!(
                    "table {display} has no column {c:?}; check --path-column"
                ))
            })?;
            let ty: String = found.get(1);
            if !(ty == "text" || ty.starts_with("character varying")) {
                return Err(config_error(format!(
                    "--path-column {c:?} is of type {ty}; with several --path-column each must \
                     be text or varchar"
                )));
            }
            if !found.get::<_, bool>(3) {
                return Err(config_error(format!(
                    "--path-column {c:?} uses the nondeterministic collation {:?}, under \
                     which different keys compare equal; give it a deterministic collation \
                     (e.g. \"C\") first",
                    found.get::<_, Option<String>>(2).unwrap_or_default()
                )));
            }
            attnums.push((c.clone(), found.get(0)));
        }
        if let Some(c) = &cfg.checksum_column {
            let found = column(c).await?.ok_or_else(|| {
                config_error(format!(
                    "table {display} has no column {c:?}; check --checksum-column"
                ))
            })?;
            let ty: String = found.get(1);
            if !(ty == "text" || ty.starts_with("character varying")) {
                return Err(config_error(format!(
                    "--checksum-column {c:?} is of type {ty}; it must be text or varchar (a \
                     base64 MD5)"
                )));
            }
        }
        let reference = Reference::new(cfg, &path_pg_type);
        // S3 keys are byte strings. Under a nondeterministic collation `=` takes
        // `IMAGE/A.PNG` for `image/a.png`: a lookup would pair a row with another row's
        // object and a compare-and-swap would pass on a changed value.
        if !path.get::<_, bool>(3) {
            return Err(config_error(format!(
                "--path-column {:?} uses the nondeterministic collation {:?}, under which \
                 different keys compare equal; relocator compares keys byte for byte. Give \
                 the column a deterministic collation (e.g. \"C\") first",
                cfg.path_column,
                path.get::<_, Option<String>>(2).unwrap_or_default()
            )));
        }
        let unique: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL
                                   AND i.indnkeyatts = 1 AND i.indkey[0] = $2)",
                &[&oid, &id_attnum],
            )
            .await?
            .get(0);
        if !unique {
            return Err(config_error(format!(
                "--id-column {:?} of {display} has no unique index, so rows cannot be addressed \
                 one by one; name the primary key with --id-column",
                cfg.id_column
            )));
        }
        // A unique index allows many NULLs, and a row without an id can be neither paged
        // to nor rewritten by id: refuse rather than pass over it and report success.
        let null_ids: bool = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {}.{} AS t WHERE t.{} IS NULL AND {})",
                    quote_ident(&schema),
                    quote_ident(&name),
                    quote_ident(&cfg.id_column),
                    reference.selects(Side::Source, "t")
                ),
                &[],
            )
            .await
            .context("looking for rows without an id")?
            .get(0);
        if null_ids {
            return Err(config_error(format!(
                "--id-column {:?} of {display} is NULL in some rows under the source prefix, so \
                 they cannot be addressed one by one; give them ids (or name a NOT NULL unique \
                 column with --id-column), then rerun",
                cfg.id_column
            )));
        }
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        if !rls_hiding(client, std::slice::from_ref(&qualified))
            .await?
            .is_empty()
        {
            return Err(config_error(format!(
                "row-level security on {display} may hide rows from this role (a SELECT \
                 policy other than USING (true)): relocator must see every row, or it would \
                 delete objects that rows it cannot see still use. Run as the table's \
                 owner or a role with BYPASSRLS"
            )));
        }
        let path_indexed: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = $1 AND i.indpred IS NULL
                                   AND i.indkey[0] = $2)",
                &[&oid, &path_attnum],
            )
            .await?
            .get(0);
        let own: Vec<String> = std::iter::once(&cfg.path_column)
            .chain(&cfg.more_columns)
            .map(|c| format!("{qualified}.{}", quote_ident(c)))
            .collect();
        let mut referencing: Vec<Referencing> = Vec::new();
        let mut wanted: Vec<(ColumnRef, bool)> = cfg
            .referenced_by
            .iter()
            .map(|r| (r.clone(), false))
            .collect();
        for stored in remembered_references(client, &display).await? {
            let r = ColumnRef::parse(&stored).with_context(|| {
                format!("the ledger remembers --referenced-by {stored:?} for this table")
            })?;
            wanted.push((r, true));
        }
        for (r, stored) in wanted {
            let found = Referencing::resolve(client, &r).await.map_err(|e| {
                if stored {
                    e.context(format!(
                        "an earlier run on this table was given --referenced-by {r}, and \
                         relocator keeps honouring it"
                    ))
                } else {
                    e
                }
            })?;
            if !own.contains(&found.name) && !referencing.iter().any(|x| x.name == found.name) {
                referencing.push(found);
            }
        }
        services_agree(client, cfg, &display).await?;
        // What the column accepts. With several, each column's declared length applies to
        // its own key; their CHECK constraints are left to the commit (`rejected`).
        let limits = if cfg.more_columns.is_empty() {
            ColumnLimits::resolve(client, oid, path_attnum).await?
        } else {
            let mut by_column = Vec::new();
            let mut counts_bytes = false;
            for (name, attnum) in attnums {
                let one = ColumnLimits::resolve(client, oid, attnum).await?;
                counts_bytes = one.counts_bytes;
                if let Some(max) = one.max_chars {
                    by_column.push((name, max));
                }
            }
            ColumnLimits {
                by_column,
                counts_bytes,
                ..ColumnLimits::default()
            }
        };
        let encoding: String = client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await
            .context("reading the database's encoding")?
            .get(0);
        Ok(TableInfo {
            held_keys: crate::s3::HeldKeys {
                ascii_only: !matches!(encoding.as_str(), "UTF8" | "SQL_ASCII"),
            },
            qualified,
            display,
            id_col: quote_ident(&cfg.id_column),
            path_col: quote_ident(&cfg.path_column),
            more_cols: cfg.more_columns.iter().map(|c| quote_ident(c)).collect(),
            id_type,
            path_indexed,
            referencing,
            limits,
            reference,
            checksum_col: cfg.checksum_column.as_deref().map(quote_ident),
        })
    }

    /// $1 keys: which of them a `--referenced-by` column references (`None` without
    /// such columns).
    pub fn referenced_elsewhere(&self) -> Option<String> {
        let parts: Vec<String> = self
            .referencing
            .iter()
            .map(|r| {
                let (other, col) = (&r.qualified, &r.column);
                format!("SELECT {col}::text FROM {other} WHERE {col} = ANY ($1::text[])")
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(" UNION "))
    }

    /// `--checksum-column`: $1 ids → (id, checksum) of those rows.
    pub fn checksums_query(&self) -> Option<String> {
        let (tbl, id, ty) = (&self.qualified, &self.id_col, self.id_type);
        self.checksum_col.as_ref().map(|c| {
            format!(
                "SELECT t.{id}::text, t.{c}::text
                   FROM unnest($1::text[]) AS u(id) JOIN {tbl} AS t ON t.{id} = u.id::{ty}"
            )
        })
    }

    /// The referencing columns as the ledger remembers them.
    pub fn referencing_names(&self) -> Vec<String> {
        self.referencing.iter().map(|r| r.name.clone()).collect()
    }
}

impl ColumnLimits {
    /// The path column's declared length, and the CHECK constraints on it that relocator
    /// can evaluate as the UPDATE would. Left out (the commit still finds what they
    /// refuse, after the copy): one reading the whole row, one reading a generated column
    /// (computed from the new value by the UPDATE, not stored yet), a `NO INHERIT` one
    /// on a table with children (it does not apply to their rows), and, on a table with
    /// a BEFORE UPDATE trigger, one reading another column (the trigger may change it).
    async fn resolve(client: &tokio_postgres::Client, table: u32, column: i16) -> Result<Self> {
        let row = client
            .query_one(
                "SELECT format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod),
                        CASE WHEN a.atttypid = 'varchar'::regtype AND a.atttypmod >= 4
                             THEN a.atttypmod - 4 END,
                        (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.collname)
                           FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
                          WHERE c.oid = a.attcollation),
                        current_setting('server_encoding') = 'SQL_ASCII',
                        EXISTS (SELECT 1 FROM pg_trigger g
                                 WHERE g.tgrelid = a.attrelid AND NOT g.tgisinternal
                                   AND g.tgenabled <> 'D'
                                   AND g.tgtype & 1 = 1 AND g.tgtype & 2 = 2
                                   AND g.tgtype & 16 = 16),
                        EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = a.attrelid)
                   FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum = $2",
                &[&table, &column],
            )
            .await
            .context("reading the path column's declared length")?;
        let max_chars = row
            .get::<_, Option<i32>>(2)
            .map(|n| (n.max(0) as usize, row.get::<_, String>(1)));
        let (before_update, children): (bool, bool) = (row.get(5), row.get(6));
        let checks = client
            .query(
                "SELECT c.conname::text, pg_get_expr(c.conbin, c.conrelid),
                        ARRAY(SELECT quote_ident(a.attname) FROM pg_attribute a
                               WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                                 AND a.attnum <> $2 ORDER BY a.attnum),
                        0 = ANY (c.conkey)
                          OR EXISTS (SELECT 1 FROM pg_attribute a
                                      WHERE a.attrelid = c.conrelid
                                        AND a.attnum = ANY (c.conkey) AND a.attgenerated <> ''),
                        c.connoinherit
                   FROM pg_constraint c
                  WHERE c.conrelid = $1 AND c.contype = 'c' AND $2 = ANY (c.conkey)
                  ORDER BY c.conname",
                &[&table, &column],
            )
            .await
            .context("reading the CHECK constraints on the path column")?
            .into_iter()
            .filter_map(|r| {
                let check = Check {
                    name: r.get(0),
                    expr: r.get(1),
                    columns: r.get(2),
                };
                let (whole_or_generated, no_inherit): (bool, bool) = (r.get(3), r.get(4));
                let left_to_commit = whole_or_generated
                    || (no_inherit && children)
                    || (before_update && !check.columns.is_empty());
                (!left_to_commit).then_some(check)
            })
            .collect();
        Ok(ColumnLimits {
            max_chars,
            by_column: Vec::new(),
            checks,
            base_type: row.get(0),
            collation: row.get(3),
            counts_bytes: row.get(4),
        })
    }
}

/// Of `tables` (quoted schema.table names), those whose rows row-level security may hide
/// from this role: it is on, the role does not bypass it (superuser, BYPASSRLS, the
/// owner of a table that does not FORCE it), and the SELECT policies that apply to the
/// role are not all-seeing (a permissive `USING (true)` and no restrictive one). Checked
/// when the tables are resolved and again inside every cleanup's locked transaction (a
/// policy enabled, or BYPASSRLS taken away, while a run works).
pub async fn rls_hiding(client: &tokio_postgres::Client, tables: &[String]) -> Result<Vec<String>> {
    let rows = client
        .query(
            "WITH me AS (SELECT rolsuper OR rolbypassrls AS bypass FROM pg_roles
                          WHERE rolname = current_user)
             SELECT n.nspname || '.' || c.relname
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = ANY ($1::text[]::regclass[])
                AND c.relrowsecurity
                AND NOT (SELECT bypass FROM me)
                AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
                AND NOT (EXISTS (SELECT 1 FROM pg_policy p
                                  WHERE p.polrelid = c.oid AND p.polcmd IN ('r', '*')
                                    AND p.polpermissive
                                    AND pg_get_expr(p.polqual, p.polrelid) = 'true'
                                    AND (0::oid = ANY (p.polroles)
                                         OR EXISTS (SELECT 1 FROM unnest(p.polroles) r
                                                     WHERE pg_has_role(r, 'USAGE'))))
                         AND NOT EXISTS (SELECT 1 FROM pg_policy p
                                  WHERE p.polrelid = c.oid AND p.polcmd IN ('r', '*')
                                    AND NOT p.polpermissive
                                    AND coalesce(pg_get_expr(p.polqual, p.polrelid), '') <> 'true'
                                    AND (0::oid = ANY (p.polroles)
                                         OR EXISTS (SELECT 1 FROM unnest(p.polroles) r
                                                     WHERE pg_has_role(r, 'USAGE')))))",
            &[&tables],
        )
        .await
        .context("looking at the tables' row-level security")?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// The `--referenced-by` columns runs on this table recorded (`display`: schema.table as
/// the ledger names it). Read at start, and again by every cleanup before it deletes.
/// A `--service-column` job puts each service in a bucket, and the cleanup trusts that
/// (a row of the destination's service never uses a source object). Earlier runs on the
/// table that put one of its services in another bucket make the job ambiguous: refused.
/// Checked when the table is resolved, and again in `run`'s registration, under a lock
/// per table, so two jobs started at once cannot both pass it.
pub async fn services_agree<C: tokio_postgres::GenericClient>(
    client: &C,
    cfg: &JobConfig,
    display: &str,
) -> Result<()> {
    let Some(svc) = &cfg.service else {
        return Ok(());
    };
    if !runs_column_readable(client, "services").await? {
        return Ok(());
    }
    for (service, bucket, flag) in [
        (&svc.source, &cfg.source.bucket, "--source-service/--source"),
        (&svc.dest, &cfg.dest.bucket, "--dest-service/--dest"),
    ] {
        let other: Option<(i64, String)> = client
            .query_opt(
                "SELECT run_id, services->'buckets'->>$3 FROM relocator.runs
                  WHERE table_name = $1 AND services->>'column' = $2
                    AND services->'buckets' ? $3 AND services->'buckets'->>$3 <> $4
                  ORDER BY run_id DESC LIMIT 1",
                &[&display, &svc.column, service, bucket],
            )
            .await
            .context("reading the services earlier runs on this table were given")?
            .map(|r| (r.get(0), r.get(1)));
        if let Some((run, theirs)) = other {
            return Err(config_error(format!(
                "{flag}: this job puts {} {service:?} in bucket {bucket:?}, but run {run} on \
                 {display} put it in bucket {theirs:?}. A service names one bucket, and the \
                 cleanup relies on it; check the job's services and buckets against \
                 config/storage.yml",
                svc.column
            )));
        }
    }
    Ok(())
}

/// Whether the ledger's `relocator.runs` has `column` and this role may read it: from
/// the catalog alone, as to_regclass would fail for a role without USAGE on the ledger's
/// schema (a reader running `verify` or `status`), and an older ledger lacks the column.
async fn runs_column_readable<C: tokio_postgres::GenericClient>(
    client: &C,
    column: &str,
) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute a
                              JOIN pg_class c ON c.oid = a.attrelid
                              JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = 'relocator' AND c.relname = 'runs'
                               AND a.attname = $1 AND NOT a.attisdropped
                               AND has_schema_privilege(n.oid, 'USAGE')
                               AND has_table_privilege(c.oid, 'SELECT'))",
            &[&column],
        )
        .await
        .with_context(|| format!("looking for the ledger's column runs.{column}"))?
        .get(0))
}

pub async fn remembered_references(
    client: &tokio_postgres::Client,
    display: &str,
) -> Result<Vec<String>> {
    if !runs_column_readable(client, "referenced_by").await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT DISTINCT unnest(referenced_by) FROM relocator.runs WHERE table_name = $1",
            &[&display],
        )
        .await
        .context(
            "reading the columns earlier runs on this table were told reference its objects",
        )?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

impl Referencing {
    /// Resolve one `--referenced-by` against the catalog: the column must be text or
    /// varchar under a deterministic collation, readable, and its table lockable against
    /// writers (`LOCK … IN SHARE MODE` needs UPDATE, DELETE or TRUNCATE). Every mismatch
    /// is a [`crate::config::ConfigError`] naming the fix.
    async fn resolve(client: &tokio_postgres::Client, r: &ColumnRef) -> Result<Referencing> {
        let t = &r.table;
        let row = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text, a.attnum IS NOT NULL,
                        coalesce(format_type(a.atttypid, a.atttypmod), ''),
                        coalesce(co.collisdeterministic, true),
                        a.attnum IS NOT NULL AND has_column_privilege(c.oid, a.attnum, 'SELECT'),
                        has_table_privilege(c.oid, 'UPDATE') OR has_table_privilege(c.oid, 'DELETE')
                            OR has_table_privilege(c.oid, 'TRUNCATE'),
                        EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = c.oid AND i.indpred IS NULL
                                   AND i.indkey[0] = a.attnum),
                        c.oid
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3
                                           AND a.attnum > 0 AND NOT a.attisdropped
                   LEFT JOIN pg_collation co ON co.oid = a.attcollation
                  WHERE c.relname = $1
                    AND c.relkind IN ('r', 'p')
                    AND CASE WHEN $2::text IS NULL
                             THEN n.nspname = ANY (current_schemas(false))
                             ELSE n.nspname = $2::text END
                  ORDER BY array_position(current_schemas(false), n.nspname::text)
                  LIMIT 1",
                &[&t.name, &t.schema, &r.column],
            )
            .await
            .context("looking up a --referenced-by column in the catalog")?;
        let Some(row) = row else {
            return Err(config_error(format!(
                "--referenced-by {r}: table {t} does not exist (or this role cannot see it); \
                 name it as for --table"
            )));
        };
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let ty: String = row.get(3);
        let fail = |why: &str| Err(config_error(format!("--referenced-by {r}: {why}")));
        if schema == LEDGER_SCHEMA {
            return fail(&format!(
                "resolves to {schema}.{name}, relocator's own ledger (the role's search_path \
                 finds the schema \"relocator\" first); name the application's table with \
                 its schema (e.g. public.{name}.{})",
                r.column
            ));
        }
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        if !rls_hiding(client, std::slice::from_ref(&qualified))
            .await?
            .is_empty()
        {
            return fail(&format!(
                "row-level security on {schema}.{name} may hide rows from this role (a \
                 SELECT policy other than USING (true)), and a reference relocator cannot \
                 see does not keep an object. Run as the table's owner or a role with \
                 BYPASSRLS"
            ));
        }
        if !row.get::<_, bool>(2) {
            return fail(&format!(
                "table {schema}.{name} has no column {:?}",
                r.column
            ));
        }
        if !(ty == "text" || ty.starts_with("character varying")) {
            return fail(&format!(
                "the column is of type {ty}; it must be text or varchar"
            ));
        }
        if !row.get::<_, bool>(4) {
            return fail(
                "the column uses a nondeterministic collation, under which different keys \
                 compare equal",
            );
        }
        if !row.get::<_, bool>(5) {
            return fail(&format!(
                "this role cannot read the column; GRANT SELECT ON {qualified} TO the role"
            ));
        }
        if !row.get::<_, bool>(6) {
            return fail(&format!(
                "before each delete relocator holds the table's writers off for a moment \
                 (LOCK … IN SHARE MODE), which needs UPDATE; GRANT UPDATE ON {qualified} \
                 TO the role"
            ));
        }
        let column = quote_ident(&r.column);
        Ok(Referencing {
            name: format!("{qualified}.{column}"),
            qualified,
            column,
            indexed: row.get(7),
        })
    }
}

/// A statement as one line, as pg_stat_activity shows it (its first 1 KiB).
fn one_line(sql: String) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every statement relocator sends for one table, built once from the quoted identifiers.
#[derive(Debug, Clone)]
pub struct Queries {
    /// The table as the ledger names it (schema.table).
    pub table: String,
    /// The columns the reference checks look at (the job's own and `--referenced-by`),
    /// as the ledger names them.
    pub checked_columns: Vec<String>,
    /// The tables those columns are in (quoted): the cleanup holds their writers off and
    /// checks their row-level security again.
    pub checked_tables: Vec<String>,
    /// Keyset scans, indexed by [`Queries::scan`]: with/without a lower bound (exclusive,
    /// the last id seen) and an upper bound (inclusive, the lease's end). Parameters: the
    /// bounds present (as text), then the limit. The sort key is
    /// qualified (`t.id`): a bare `ORDER BY id` would sort by the `id::text` output
    /// column, i.e. as strings.
    scans: [String; 4],
    /// The id `$n` selected rows after the frontier: a new lease's upper bound. With and
    /// without a lower bound.
    lease_end: [String; 2],
    /// The guarded rewrite + ledger rows + lease progress, one statement. See
    /// [`crate::pipeline::commit`]. Rows the table refused (`try` false) are not rewritten; copies
    /// made for rows not rewritten go to `relocator.take_backs`, taken back only once the
    /// run is finished. An object the batch found already there counts as relocator's
    /// copy when another batch of the same run noted it was creating it (see
    /// [`crate::pipeline::cleanup::BatchIntents`]): that batch was killed, or lost its lease, before
    /// its commit. (No SQL comments inside: pg_stat_activity shows the first 1 KiB.)
    pub commit: String,
    /// $1 ids, $2 new values: the rows whose new value a CHECK constraint on the path
    /// column refuses, each with the (1-based) positions in
    /// [`ColumnLimits::checks`] of the constraints it fails. Only reads; `None` without
    /// such constraints. See [`crate::pipeline::limits`].
    pub checks: Option<String>,
    /// How a row points at its object (for the parameters of [`Queries::referenced`]).
    pub reference: Reference,
    /// $1 ids: (id, the `--checksum-column`) of those rows; `None` without the option.
    /// See [`crate::pipeline::checksum`].
    pub checksums: Option<String>,
    /// $1 keys (and, where the shape takes it, $2 [`Reference::param`] for their
    /// bucket): which of them some row still references.
    pub referenced: String,
    /// One row's guarded rewrite ($1 id, $2 old, $3 new, $4 the checksum the commit
    /// guards or NULL), tried inside a transaction that is rolled back: which rows of a batch the table refuses. See [`crate::pipeline::commit`].
    pub probe: String,
    /// Rollback's: one row's guarded rewrite back ($1 id, $2 the new key it must still
    /// hold, $3 the old key, $4 NULL), tried like [`Queries::probe`].
    pub probe_back: String,
    /// A batch's guarded rewrites ($1 ids, $2 olds, $3 news) tried at once inside a
    /// transaction that is rolled back (`plan`): (id, new, stored) of the rows it wrote.
    pub probe_batch: String,
    /// Waits for every application transaction writing the table to end and keeps new
    /// ones out until the transaction ends: see [`crate::pipeline::cleanup::delete_unreferenced`].
    pub lock_writers: String,
    /// $1 keys: the rows referencing them, in id order (phase 1; uses the path index).
    pub lookup: String,
    /// Rollback: the ledger entries of runs $1 not rolled back yet, after move $2, with
    /// the row's current value: `[0]` at most $3 of them, `[1]` those of rows $3. See
    /// [`crate::commands::rollback`].
    pub to_undo: [String; 2],
    /// Rollback: the guarded rewrite back + the ledger marks, one statement. Rows the
    /// table refused (`refused`) are left out, their moves not marked; like the forward
    /// commit it checks what the table stored. See [`crate::commands::rollback`].
    pub undo: String,
}

impl Queries {
    pub fn new(t: &TableInfo) -> Queries {
        let (tbl, id, path, ty) = (&t.qualified, &t.id_col, &t.path_col, t.id_type);
        let r = &t.reference;
        let (on_src, on_dst) = (r.on(Side::Source, "t"), r.on(Side::Dest, "t"));
        let value = r.value("t");
        let (set_new, holds_old) = (r.assign("u.new_value"), r.holds("t", "u.old_value"));
        let (set_src, set_dst) = (r.set(Side::Source), r.set(Side::Dest));
        // --checksum-column: the checksum read before the commit is guarded with the key.
        let same_checksum = t
            .checksum_col
            .as_ref()
            .map(|c| format!(" AND t.{c} IS NOT DISTINCT FROM u.checksum"))
            .unwrap_or_default();
        // The probe's $4: the checksum the commit guards, if it read one.
        let probe_checksum = match &t.checksum_col {
            Some(c) => format!(" AND ($4::text IS NULL OR t.{c} IS NOT DISTINCT FROM $4::text)"),
            None => " AND $4::text IS NULL".to_owned(),
        };
        let selected = r.selects(Side::Source, "t");
        let scan = |lower: bool, upper: bool| {
            let mut n = 0;
            let mut next = || {
                n += 1;
                format!("${n}")
            };
            let mut conds = Vec::new();
            if lower {
                conds.push(format!("t.{id} > {}::text::{ty}", next()));
            }
            if upper {
                conds.push(format!("t.{id} <= {}::text::{ty}", next()));
            }
            conds.push(selected.clone());
            format!(
                "SELECT t.{id}::text, {value} FROM {tbl} AS t WHERE {} ORDER BY t.{id} LIMIT {}",
                conds.join(" AND "),
                next()
            )
        };
        let lease_end = |lower: bool| {
            let (cond, o) = if lower {
                (format!("t.{id} > $1::text::{ty} AND "), "$2")
            } else {
                (String::new(), "$1")
            };
            format!(
                "SELECT t.{id}::text FROM {tbl} AS t WHERE {cond}{selected}
                  ORDER BY t.{id} OFFSET {o} LIMIT 1"
            )
        };
        Queries {
            table: t.display.clone(),
            checked_tables: std::iter::once(tbl.clone())
                .chain(t.referencing.iter().map(|r| r.qualified.clone()))
                .collect(),
            checked_columns: t
                .referencing_names()
                .into_iter()
                .chain(
                    std::iter::once(path)
                        .chain(&t.more_cols)
                        .map(|c| format!("{tbl}.{c}")),
                )
                .collect(),
            scans: [
                scan(false, false),
                scan(true, false),
                scan(false, true),
                scan(true, true),
            ],
            lease_end: [lease_end(false), lease_end(true)],
            checks: checks_query(t),
            reference: t.reference.clone(),
            checksums: t.checksums_query(),
            commit: one_line(format!(
                "WITH lease AS (
                     UPDATE relocator.leases SET last_id = $9, heartbeat = clock_timestamp(), done = $12
                      WHERE lease_id = $10 AND owner = $11
                  RETURNING lease_id
                 ), u AS (
                     SELECT u.id, u.old_path, u.new_path, u.src_etag, u.try, u.dst_etag, u.size,
                            u.src_version, u.checksum, u.old_value, u.new_value,
                            u.copied OR EXISTS (
                                SELECT 1 FROM relocator.reservations r
                                  JOIN relocator.leases l ON l.lease_id = r.lease_id
                                 WHERE r.bucket = $8 AND r.key = u.new_path AND r.creating
                                   AND r.holder <> $15 AND l.run_id = $5) AS copied
                       FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[],
                                   $13::text[], $14::bool[], $16::text[], $17::bigint[],
                                   $18::text[], $19::text[], $20::text[], $21::text[])
                              AS u(id, old_path, new_path, copied, src_etag, try, dst_etag, size,
                                   src_version, checksum, old_value, new_value)
                      WHERE EXISTS (SELECT 1 FROM lease)
                 ), upd AS (
                     UPDATE {tbl} AS t SET {set_new}{set_dst}
                       FROM u
                      WHERE u.try AND t.{id} = u.id::{ty} AND {holds_old}{on_src}{same_checksum}
                  RETURNING u.id, u.new_value, {value} AS stored
                 ), chk AS (
                     SELECT 1 FROM upd WHERE stored IS DISTINCT FROM new_value
                        AND relocator.refuse_stored(new_value, stored)
                 ), led AS (
                     INSERT INTO relocator.moves
                            (run_id, table_name, row_id, old_path, new_path,
                             src_bucket, dst_bucket, copied, lease_id, src_etag, dst_etag, size,
                             src_version, old_value, new_value)
                     SELECT $5, $6, u.id, u.old_path, u.new_path, $7, $8, u.copied, $10, u.src_etag,
                            u.dst_etag, u.size, u.src_version,
                            CASE WHEN u.old_value <> u.old_path THEN u.old_value END,
                            CASE WHEN u.new_value <> u.new_path THEN u.new_value END
                       FROM u JOIN upd ON upd.id = u.id
                  RETURNING move_id, row_id, copied, old_path, new_path
                 ), released AS (
                     DELETE FROM relocator.reservations WHERE holder = $15 AND EXISTS (SELECT 1 FROM lease)
                 ), tb AS (
                     INSERT INTO relocator.take_backs (run_id, dst_bucket, dst_key, src_etag, dst_etag)
                     SELECT DISTINCT $5::bigint, $8::text, u.new_path, u.src_etag, u.dst_etag FROM u
                      WHERE u.copied AND NOT EXISTS (SELECT 1 FROM upd WHERE upd.id = u.id)
                     ON CONFLICT DO NOTHING
                 )
                 SELECT l.lease_id, led.move_id, led.row_id, led.copied, led.old_path, led.new_path
                   FROM lease l LEFT JOIN led ON true
                  WHERE NOT EXISTS (SELECT 1 FROM chk)"
            )),
            lock_writers: format!(
                "LOCK TABLE {} IN SHARE MODE",
                std::iter::once(tbl.as_str())
                    .chain(t.referencing.iter().map(|r| r.qualified.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            probe_batch: format!(
                "UPDATE {tbl} AS t SET {set_new}{set_dst}
                   FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, old_value, new_value)
                  WHERE t.{id} = u.id::{ty} AND {holds_old}{on_src}
                 RETURNING u.id, u.new_value, {value}"
            ),
            probe: format!(
                "UPDATE {tbl} AS t SET {}{set_dst} WHERE t.{id} = $1::text::{ty} AND {}{on_src}{probe_checksum}
                 RETURNING {value}",
                r.assign("$3::text"),
                r.holds("t", "$2::text")
            ),
            probe_back: format!(
                "UPDATE {tbl} AS t SET {}{set_src} WHERE t.{id} = $1::text::{ty} AND {}{on_dst} AND $4::text IS NULL
                 RETURNING {value}",
                r.assign("$3::text"),
                r.holds("t", "$2::text")
            ),
            referenced: std::iter::once(r.referenced(tbl))
            .chain(t.referenced_elsewhere())
            .collect::<Vec<_>>()
            .join(" UNION "),
            lookup: format!(
                "SELECT t.{id}::text, t.{path}::text FROM {tbl} AS t
                  WHERE t.{path} = ANY ($1::text[]){on_src} ORDER BY t.{id}"
            ),
            to_undo: [
                "ORDER BY m.move_id LIMIT $3",
                "AND m.row_id = ANY ($3) ORDER BY m.move_id",
            ]
            .map(|rest| {
                format!(
                    "SELECT m.move_id, m.row_id, m.old_path, m.new_path,
                            CASE WHEN t.{id} IS NOT NULL{on_dst} THEN {value} END,
                            coalesce(m.old_value, m.old_path), coalesce(m.new_value, m.new_path)
                       FROM relocator.moves m
                       LEFT JOIN {tbl} AS t ON t.{id} = m.row_id::{ty}
                      WHERE m.run_id = ANY ($1) AND m.rolled_back_at IS NULL AND m.move_id > $2
                      {rest}"
                )
            }),
            undo: format!(
                "WITH u AS (
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bool[],
                                      $6::bool[], $9::text[], $10::text[])
                          AS u(move_id, id, old_path, new_path, try, refused, old_value, new_value)
             ), upd AS (
                 UPDATE {tbl} AS t SET {}{set_src}
                   FROM u
                  WHERE u.try AND NOT u.refused AND t.{id} = u.id::{ty} AND {}{on_dst}
              RETURNING u.id, u.old_value, u.new_value, {value} AS stored
             ), chk AS (
                 SELECT 1 FROM upd WHERE stored IS DISTINCT FROM old_value
                    AND relocator.refuse_stored(old_value, stored)
             )
             UPDATE relocator.moves m
                SET rolled_back_at = now(),
                    rollback = CASE WHEN upd.id IS NULL THEN 'changed_by_app' ELSE 'restored' END,
                    -- The forward cleanup no longer applies: the row references the old key.
                    cleaned_at = CASE WHEN upd.id IS NOT NULL THEN coalesce(m.cleaned_at, now())
                                      ELSE m.cleaned_at END,
                    cleanup = CASE WHEN upd.id IS NOT NULL AND m.cleaned_at IS NULL
                                   THEN 'rolled_back' ELSE m.cleanup END,
                    -- A new object relocator did not create (no move of the table copied
                    -- it, or its copy was removed since: an object there now is another's)
                    -- is not relocator's to delete.
                    rollback_cleaned_at = CASE WHEN upd.id IS NOT NULL AND NOT o.copied
                                               THEN now() END,
                    rollback_cleanup = CASE WHEN upd.id IS NOT NULL AND NOT o.copied
                                            THEN 'not_ours' END
               FROM u LEFT JOIN upd ON upd.id = u.id AND upd.old_value = u.old_value
                                   AND upd.new_value = u.new_value
                      CROSS JOIN LATERAL (
                          SELECT EXISTS (SELECT 1 FROM relocator.moves c
                                          WHERE c.table_name = $7 AND c.new_path = u.new_path
                                            AND c.dst_bucket = $8 AND c.copied
                                            AND coalesce(c.rollback_cleanup, 'still_referenced')
                                                = 'still_referenced') AS copied) o
              WHERE m.move_id = u.move_id AND m.rolled_back_at IS NULL AND NOT u.refused
                AND NOT EXISTS (SELECT 1 FROM chk)
          RETURNING m.move_id, m.rollback = 'restored'",
                r.assign("u.old_value"),
                r.holds("t", "u.new_value")
            ),
        }
    }

    /// The scan statement for these bounds.
    pub fn scan(&self, lower: bool, upper: bool) -> &str {
        &self.scans[usize::from(lower) + 2 * usize::from(upper)]
    }

    pub fn lease_end(&self, lower: bool) -> &str {
        &self.lease_end[usize::from(lower)]
    }
}

/// The statement behind [`Queries::checks`]. Each CHECK expression is evaluated as the
/// table would evaluate it on the UPDATE: over a row made of the row's columns it reads,
/// with the path column holding the new value (as the column's type without its length,
/// so no cast cuts it short). A CHECK fails only when false (NULL passes).
fn checks_query(t: &TableInfo) -> Option<String> {
    let checks = &t.limits.checks;
    if checks.is_empty() {
        return None;
    }
    let (tbl, id, path, ty) = (&t.qualified, &t.id_col, &t.path_col, t.id_type);
    let mut columns: Vec<&str> = checks
        .iter()
        .flat_map(|c| c.columns.iter().map(String::as_str))
        .collect();
    columns.sort_unstable();
    columns.dedup();
    // The rewrite sets the service column too: a CHECK reading it sees its new value.
    let others: String = columns
        .iter()
        .map(|c| match t.reference.service_value(Side::Dest) {
            Some(v) if Some(*c) == t.reference.service_column() => format!(", {v} AS {c}"),
            _ => format!(", t.{c} AS {c}"),
        })
        .collect();
    let fails: Vec<String> = checks
        .iter()
        .enumerate()
        .map(|(i, c)| format!("CASE WHEN ({}) IS FALSE THEN {} END", c.expr, i + 1))
        .collect();
    Some(one_line(format!(
        "SELECT x.\"relocator row id\", array_remove(ARRAY[{}], NULL)::int[]
           FROM (SELECT u.id AS \"relocator row id\"{others},
                        u.new_value::{base}{collate} AS {path}
                   FROM unnest($1::text[], $2::text[]) AS u(id, new_value)
                   JOIN {tbl} AS t ON t.{id} = u.id::{ty}) AS x
          WHERE {}",
        fails.join(", "),
        checks
            .iter()
            .map(|c| format!("({}) IS FALSE", c.expr))
            .collect::<Vec<_>>()
            .join(" OR "),
        base = t.limits.base_type,
        collate = t
            .limits
            .collation
            .as_ref()
            .map(|c| format!(" COLLATE {c}"))
            .unwrap_or_default(),
    )))
}

/// The server's own message for an error it sent ("permission denied for ..."), else
/// the client error.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => d.message().to_owned(),
        None => e.to_string(),
    }
}

/// A row as the scan returns it: id and path, both as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub path: String,
}

/// One keyset batch of selected rows after `after` (exclusive) and up to `upto`
/// (inclusive), in id order.
pub async fn scan(
    client: &deadpool_postgres::Client,
    q: &Queries,
    after: Option<&str>,
    upto: Option<&str>,
    limit: usize,
) -> Result<Vec<Row>> {
    let limit = limit as i64;
    let stmt = client
        .prepare_cached(q.scan(after.is_some(), upto.is_some()))
        .await
        .context("preparing the keyset scan")?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some(a) = &after {
        params.push(a);
    }
    if let Some(u) = &upto {
        params.push(u);
    }
    params.push(&limit);
    rt(1);
    let rows = client
        .query(&stmt, &params)
        .await
        .context("scanning the next batch of rows")?;
    Ok(rows
        .into_iter()
        .map(|r| Row {
            id: r.get(0),
            path: r.get(1),
        })
        .collect())
}

/// Tables with more rows than this (by the planner's statistics) are not counted exactly
/// up front: the planner's estimate is used instead.
const EXACT_COUNT_LIMIT: f64 = 10_000_000.0;

/// Rows on `side` (under its prefix), for progress totals and estimates: an exact count
/// on tables up to [`EXACT_COUNT_LIMIT`] rows, the planner's estimate beyond.
/// Returns (rows, exact).
pub async fn count_selected(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    side: Side,
) -> Result<(u64, bool)> {
    let selected = table.reference.selects(side, "t");
    let reltuples: f32 = client
        .query_one(
            "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.qualified],
        )
        .await
        .context("reading the table's size from the catalog")?
        .get(0);
    if f64::from(reltuples) < EXACT_COUNT_LIMIT {
        let n: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} AS t WHERE {selected}",
                    table.qualified
                ),
                &[],
            )
            .await
            .context("counting the selected rows")?
            .get(0);
        return Ok((n.max(0) as u64, true));
    }
    // The selection's literals are quoted already: EXPLAIN takes no parameters.
    let explain = format!(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} AS t WHERE {selected}",
        table.qualified
    );
    let plan: serde_json::Value = client
        .query_one(&explain, &[])
        .await
        .context("estimating the selected rows")?
        .get(0);
    let rows = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
    Ok((rows.max(0.0) as u64, false))
}
