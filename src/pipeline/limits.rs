//! What the path column accepts, checked before anything is copied: a new value longer
//! than the column's declared length (Django's `varchar(100)`), or one a CHECK
//! constraint on the column refuses, is the row's `too_long` — found by `plan` and by
//! `run` before its copy, never as a refused commit after it. The commit still guards
//! everything else the table may refuse (a unique index, a trigger): those rows are
//! `rejected` there ([`super::commit`]).
//!
//! The length is counted here, without I/O. The CHECK constraints are evaluated by
//! PostgreSQL in one SELECT per batch ([`crate::db::Queries::checks`]), in a transaction
//! rolled back, taking no row lock; where one row's value makes it raise, row by row.
//! Constraints it cannot evaluate as the UPDATE would are left to the commit (see
//! [`crate::db::ColumnLimits`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio_postgres::error::SqlState;
use tracing::warn;

use super::plan::{attention, plan_batch, BatchPlan, Move};
use crate::db::{self, ColumnLimits, Queries, Row};
use crate::reference::Reference;
use crate::report::Outcome;
use crate::rewrite::Rewrite;

/// Plan one batch ([`plan_batch`]) without the rows whose new value the column would not
/// take: those are `too_long`, with the reason, and the others are planned as if they
/// were not there (a row that cannot move claims no destination, so it makes no other
/// row a `collision`).
pub async fn plan_fitting(
    db: &deadpool_postgres::Client,
    limits: &ColumnLimits,
    q: &Queries,
    rows: Vec<Row>,
    rewrite: &Rewrite,
) -> Result<BatchPlan> {
    let reference = &q.reference;
    // A column with neither a declared length nor a CHECK relocator evaluates (the usual
    // `text` column) has nothing to set aside: plan the batch as it is.
    if limits.max_chars.is_none() && limits.by_column.is_empty() && q.checks.is_none() {
        return Ok(plan_batch(rows, rewrite, reference));
    }
    // Each row planned alone: the new value of every row that could move, whichever
    // rows it would collide with.
    let mapped: Vec<Move> = rows
        .iter()
        .flat_map(|r| plan_batch(vec![r.clone()], rewrite, reference).moves)
        .collect();
    // Row id → (the reference that does not fit, empty for the whole row; why).
    let mut why = too_long(limits, reference, &mapped);
    let rest: Vec<&Move> = mapped
        .iter()
        .filter(|m| !why.contains_key(&m.row.id))
        .collect();
    let refused = refused_by_checks(db, limits, q, &rest).await?;
    why.extend(refused.into_iter().map(|(id, d)| (id, (String::new(), d))));
    if why.is_empty() {
        return Ok(plan_batch(rows, rewrite, reference));
    }
    let fit: Vec<Row> = rows
        .into_iter()
        .filter(|r| !why.contains_key(&r.id))
        .collect();
    let mut batch = plan_batch(fit, rewrite, reference);
    for m in mapped {
        let Some((at, detail)) = why.get(&m.row.id) else {
            continue;
        };
        // With several columns, the reference that does not fit is `too_long` and the
        // row's others are held back with it.
        let line = if !at.is_empty() && *at != m.at {
            attention(
                &m,
                Outcome::HeldBack,
                format!("another reference of the row does not fit its column: {detail}"),
            )
        } else {
            attention(&m, Outcome::TooLong, detail.clone())
        };
        batch.skipped.push(line);
    }
    Ok(batch)
}

/// Row id → (the column that does not fit, empty with one column; why), for the moves
/// whose new value is longer than the declared length (in characters, as PostgreSQL
/// counts `varchar(n)`; in bytes in a SQL_ASCII database). With several columns, each
/// column's new value against its own length.
fn too_long(
    limits: &ColumnLimits,
    reference: &Reference,
    moves: &[Move],
) -> HashMap<String, (String, String)> {
    let mut why = HashMap::new();
    for m in moves {
        let values: Vec<(String, &(usize, String), String)> = if limits.by_column.is_empty() {
            let Some(max) = &limits.max_chars else {
                continue;
            };
            vec![(String::new(), max, m.new_value.clone())]
        } else {
            reference
                .parts(&m.new_value)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(name, v)| {
                    let (_, max) = limits.by_column.iter().find(|(c, _)| *c == name)?;
                    Some((name, max, v?))
                })
                .collect()
        };
        for (at, (max, ty), value) in values {
            let n = if limits.counts_bytes {
                value.len()
            } else {
                value.chars().count()
            };
            if n > *max {
                let column = if at.is_empty() {
                    String::new()
                } else {
                    format!(" {at:?}")
                };
                let detail = format!(
                    "the new value is {n} characters long and the column{column} is {ty}: \
                     widen the column (ALTER TABLE ... ALTER COLUMN ... TYPE varchar({n})), or \
                     choose a shorter --dest prefix or --rewrite"
                );
                why.insert(m.row.id.clone(), (at, detail));
            }
        }
    }
    why
}

/// Warned once per process: the CHECK constraints cannot be evaluated here.
static CHECKS_SKIPPED: AtomicBool = AtomicBool::new(false);

/// An error PostgreSQL raised for one row's value (a data exception, a constraint, a
/// function that raises): the UPDATE would fail on that row the same way.
fn per_row(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| ["22", "23", "P0"].iter().any(|k| c.code().starts_with(k)))
}

/// Row id → why, for the moves a CHECK constraint on the path column refuses (false, or
/// an error raised while evaluating it). Evaluated in a transaction that is rolled
/// back, so a CHECK's function with side effects leaves none.
async fn refused_by_checks(
    db: &deadpool_postgres::Client,
    limits: &ColumnLimits,
    q: &Queries,
    moves: &[&Move],
) -> Result<HashMap<String, String>> {
    let Some(sql) = &q.checks else {
        return Ok(HashMap::new());
    };
    if moves.is_empty() || CHECKS_SKIPPED.load(Ordering::Relaxed) {
        return Ok(HashMap::new());
    }
    let failed = match evaluate(db, sql, limits, moves).await {
        Ok(found) => return Ok(found),
        Err(e) => e,
    };
    let failed = match failed.downcast::<tokio_postgres::Error>() {
        Ok(e) if per_row(&e) => e,
        Ok(e) if e.as_db_error().is_some() => return Ok(skip(&e)),
        Ok(e) => return Err(e).context("evaluating the path column's CHECK constraints"),
        Err(e) => return Err(e),
    };
    // One row's value makes the evaluation raise: find which, row by row.
    tracing::debug!(error = %db::pg_message(&failed), "evaluating the CHECKs row by row");
    let mut found = HashMap::new();
    for m in moves {
        match evaluate(db, sql, limits, std::slice::from_ref(m)).await {
            Ok(one) => found.extend(one),
            Err(e) => match e.downcast::<tokio_postgres::Error>() {
                Ok(e) if per_row(&e) => {
                    found.insert(
                        m.row.id.clone(),
                        format!(
                            "the new key fails the column's CHECK constraints: {} (SQLSTATE \
                             {}); change the constraint, or choose a --dest prefix or \
                             --rewrite it accepts",
                            db::pg_message(&e),
                            e.code().map(SqlState::code).unwrap_or("?")
                        ),
                    );
                }
                Ok(e) if e.as_db_error().is_some() => return Ok(skip(&e)),
                Ok(e) => return Err(e).context("evaluating the path column's CHECK constraints"),
                Err(e) => return Err(e),
            },
        }
    }
    Ok(found)
}

/// The constraints cannot be evaluated here (the role may not read a column they read,
/// or their expression does not stand alone): say so once, and leave the rows they
/// refuse to the commit, which finds them after their copy (`rejected`).
fn skip(e: &tokio_postgres::Error) -> HashMap<String, String> {
    if !CHECKS_SKIPPED.swap(true, Ordering::Relaxed) {
        warn!(
            "the path column's CHECK constraints cannot be evaluated before the copies ({}): \
             rows they refuse are found at the commit, after their copy, instead",
            db::pg_message(e)
        );
    }
    HashMap::new()
}

/// One evaluation of the batch's new values, inside a transaction rolled back.
async fn evaluate(
    db: &deadpool_postgres::Client,
    sql: &str,
    limits: &ColumnLimits,
    moves: &[&Move],
) -> Result<HashMap<String, String>> {
    let ids: Vec<&str> = moves.iter().map(|m| m.row.id.as_str()).collect();
    let news: Vec<&str> = moves.iter().map(|m| m.new_value.as_str()).collect();
    db::rt(3);
    db.batch_execute("BEGIN").await?;
    let rows = db.query(sql, &[&ids, &news]).await;
    db.batch_execute("ROLLBACK").await?;
    Ok(rows?
        .into_iter()
        .map(|r| {
            let id: String = r.get(0);
            let failed: Vec<i32> = r.get(1);
            let names: Vec<String> = failed
                .iter()
                .filter_map(|i| limits.checks.get(usize::try_from(*i - 1).ok()?))
                .map(|c| format!("{:?} ({})", c.name, c.expr))
                .collect();
            (
                id,
                format!(
                    "the new key fails the column's CHECK constraint {}: change the constraint, \
                     or choose a --dest prefix or --rewrite it accepts",
                    names.join(", ")
                ),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(id: &str, dst: &str) -> Move {
        Move {
            row: Row {
                id: id.into(),
                path: "image/x".into(),
            },
            at: String::new(),
            src_key: "image/x".into(),
            dst_key: dst.into(),
            new_value: dst.into(),
        }
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        let limits = ColumnLimits {
            max_chars: Some((3, "character varying(3)".into())),
            ..Default::default()
        };
        let moves = [
            mv("1", "abc"),
            mv("2", "éèê"),
            mv("3", "abcd"),
            mv("4", "éèêë"),
        ];
        let mut found: Vec<String> = too_long(&limits, &Reference::keys(), &moves)
            .into_keys()
            .collect();
        found.sort();
        assert_eq!(found, ["3", "4"]);
        assert!(too_long(&ColumnLimits::default(), &Reference::keys(), &moves).is_empty());
        // A SQL_ASCII database counts bytes.
        let bytes = ColumnLimits {
            counts_bytes: true,
            ..limits
        };
        let mut found: Vec<String> = too_long(&bytes, &Reference::keys(), &moves)
            .into_keys()
            .collect();
        found.sort();
        assert_eq!(found, ["2", "3", "4"]);
    }
}
