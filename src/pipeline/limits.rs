//! What the path column accepts, checked before anything is copied: a new value longer
//! than the column's declared length (Django's `varchar(100)`), or one a CHECK
//! constraint on the column refuses, is the row's `too_long` — found by `plan` and by
//! `run` before its copy, never as a refused commit after it. The commit still guards
//! everything else the table may refuse (a unique index, a trigger): those rows are
//! `rejected` there ([`super::commit`]).
//!
//! The length is counted here, without I/O. The CHECK constraints are evaluated by
//! PostgreSQL in one SELECT per batch ([`crate::db::Queries::checks`]), which writes
//! nothing and takes no row lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tracing::warn;

use super::plan::{attention, BatchPlan, Move};
use crate::db::{self, ColumnLimits, Queries};
use crate::report::Outcome;

/// Move the batch's rows whose new value the column would not take from `moves` to
/// `skipped`, as `too_long` with the reason. Without constraints to evaluate this is
/// only the length count.
pub async fn set_aside(
    db: &deadpool_postgres::Client,
    limits: &ColumnLimits,
    q: &Queries,
    batch: &mut BatchPlan,
) -> Result<()> {
    let mut why = too_long(limits, &batch.moves);
    let rest: Vec<&Move> = batch
        .moves
        .iter()
        .filter(|m| !why.contains_key(&m.row.id))
        .collect();
    why.extend(refused_by_checks(db, limits, q, &rest).await?);
    if why.is_empty() {
        return Ok(());
    }
    let (fit, not): (Vec<Move>, Vec<Move>) = std::mem::take(&mut batch.moves)
        .into_iter()
        .partition(|m| !why.contains_key(&m.row.id));
    batch.moves = fit;
    for m in not {
        let detail = why.remove(&m.row.id).unwrap_or_default();
        batch.skipped.push(attention(&m, Outcome::TooLong, detail));
    }
    Ok(())
}

/// Row id → why, for the moves whose new value is longer than the declared length
/// (in characters, as PostgreSQL counts `varchar(n)`).
fn too_long(limits: &ColumnLimits, moves: &[Move]) -> HashMap<String, String> {
    let Some((max, ty)) = &limits.max_chars else {
        return HashMap::new();
    };
    moves
        .iter()
        .filter_map(|m| {
            let n = m.dst_key.chars().count();
            (n > *max).then(|| {
                (
                    m.row.id.clone(),
                    format!(
                        "the new key is {n} characters long and the column is {ty}: widen the \
                         column (ALTER TABLE ... ALTER COLUMN ... TYPE varchar({n})), or choose \
                         a shorter --dest prefix or --rewrite"
                    ),
                )
            })
        })
        .collect()
}

/// Warned once per process: the role may not read a column a CHECK reads.
static CHECKS_UNREADABLE: AtomicBool = AtomicBool::new(false);

/// Row id → why, for the moves a CHECK constraint on the path column refuses.
async fn refused_by_checks(
    db: &deadpool_postgres::Client,
    limits: &ColumnLimits,
    q: &Queries,
    moves: &[&Move],
) -> Result<HashMap<String, String>> {
    let Some(sql) = &q.checks else {
        return Ok(HashMap::new());
    };
    if moves.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = moves.iter().map(|m| m.row.id.as_str()).collect();
    let news: Vec<&str> = moves.iter().map(|m| m.dst_key.as_str()).collect();
    db::rt(1);
    let rows = match db.query(sql.as_str(), &[&ids, &news]).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            // The commit still finds these rows (as `rejected`, after their copy).
            if !CHECKS_UNREADABLE.swap(true, Ordering::Relaxed) {
                warn!(
                    "this role may not read every column the path column's CHECK \
                     constraints read ({}): rows they refuse are found at the commit, after \
                     their copy, instead of before it",
                    db::pg_message(&e)
                );
            }
            return Ok(HashMap::new());
        }
        Err(e) => return Err(e).context("evaluating the path column's CHECK constraints"),
    };
    Ok(rows
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
    use crate::db::Row;

    fn mv(id: &str, dst: &str) -> Move {
        Move {
            row: Row {
                id: id.into(),
                path: "image/x".into(),
            },
            dst_key: dst.into(),
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
        let mut found: Vec<String> = too_long(&limits, &moves).into_keys().collect();
        found.sort();
        assert_eq!(found, ["3", "4"]);
        assert!(too_long(&ColumnLimits::default(), &moves).is_empty());
    }
}
