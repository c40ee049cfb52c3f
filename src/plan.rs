//! Planning a batch, without I/O: the destination key of every selected row, and the rows
//! that cannot move (unmatched, invalid key, collision). `run` and `plan` share it, which
//! is what lets `plan` predict exactly what `run` does.

use std::collections::HashMap;

use crate::db::Row;
use crate::report::{Outcome, ReportLine};
use crate::rewrite::{Mapped, Rewrite};

/// A row that can move, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub row: Row,
    pub dst_key: String,
}

/// A batch split into what may move and what is reported without touching anything.
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub moves: Vec<Move>,
    pub skipped: Vec<ReportLine>,
}

/// Plan one batch. Rows arrive in id order; when two rows with different sources map to
/// one destination key, the first keeps it and the others are `collision`s (rows sharing
/// one source, like a default avatar, all move: it is one object).
pub fn plan_batch(rows: Vec<Row>, rewrite: &Rewrite) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut claimed: HashMap<String, String> = HashMap::new();
    for row in rows {
        match rewrite.map(&row.path) {
            Mapped::To(dst_key) => match claimed.get(&dst_key) {
                Some(src) if *src != row.path => plan.skipped.push(ReportLine {
                    detail: format!("{src:?} maps to the same destination key"),
                    id: row.id,
                    old_path: row.path,
                    new_path: dst_key,
                    outcome: Outcome::Collision,
                }),
                _ => {
                    claimed.insert(dst_key.clone(), row.path.clone());
                    plan.moves.push(Move { row, dst_key });
                }
            },
            Mapped::Unmatched => plan.skipped.push(ReportLine {
                detail: "--rewrite does not match this path".into(),
                id: row.id,
                old_path: row.path,
                new_path: String::new(),
                outcome: Outcome::Unmatched,
            }),
            Mapped::Invalid(e) => plan.skipped.push(ReportLine {
                detail: e.to_string(),
                id: row.id,
                old_path: row.path,
                new_path: String::new(),
                outcome: Outcome::InvalidKey,
            }),
        }
    }
    plan
}

/// The distinct (source key, destination key) pairs of a batch: one copy each, however
/// many rows share the object.
pub fn distinct_pairs(moves: &[Move]) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    moves
        .iter()
        .filter(|m| seen.insert((m.row.path.as_str(), m.dst_key.as_str())))
        .map(|m| (m.row.path.clone(), m.dst_key.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn row(id: u32, path: &str) -> Row {
        Row {
            id: id.to_string(),
            path: path.into(),
        }
    }

    #[test]
    fn shared_sources_move_together_and_copy_once() {
        let rw = Rewrite::new("image/", "avatar/", None);
        let p = plan_batch(
            vec![
                row(1, "image/default.png"),
                row(2, "image/a.png"),
                row(3, "image/default.png"),
            ],
            &rw,
        );
        assert_eq!(p.moves.len(), 3);
        assert!(p.skipped.is_empty());
        assert_eq!(distinct_pairs(&p.moves).len(), 2);
    }

    #[test]
    fn different_sources_onto_one_key_collide_after_the_first() {
        let re = Regex::new(r"^.*\.(png|jpg)$").unwrap();
        let rw = Rewrite::new("image/", "avatar/", Some((re, "same.$1".into())));
        let p = plan_batch(
            vec![
                row(1, "image/a.png"),
                row(2, "image/b.png"),
                row(3, "image/c.jpg"),
            ],
            &rw,
        );
        assert_eq!(
            p.moves
                .iter()
                .map(|m| m.row.id.as_str())
                .collect::<Vec<_>>(),
            ["1", "3"]
        );
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].outcome, Outcome::Collision);
        assert_eq!(p.skipped[0].id, "2");
    }

    #[test]
    fn unmatched_and_invalid_rows_are_skipped_with_a_reason() {
        let re = Regex::new(r"^keep-(.*)$").unwrap();
        let rw = Rewrite::new("image/", "avatar/", Some((re, "$1".into())));
        let p = plan_batch(
            vec![
                row(1, "image/keep-a"),
                row(2, "image/other"),
                row(3, "image/keep-"),
            ],
            &rw,
        );
        assert_eq!(p.moves.len(), 1);
        let outcomes: Vec<_> = p.skipped.iter().map(|l| l.outcome).collect();
        assert_eq!(outcomes, [Outcome::Unmatched, Outcome::InvalidKey]);
    }
}
