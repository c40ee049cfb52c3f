//! Planning a batch, without I/O: the destination key of every selected row, the rows
//! that cannot move (unmatched, invalid key, collision), and the outcome of each row once
//! the copy stage has judged its pair ([`split_ready`]). `run` and `plan` share it, which
//! is what lets `plan` predict exactly what `run` does.

use std::collections::HashMap;

use super::copy::{Made, PairResult};
use crate::db::Row;
use crate::reference::Reference;
use crate::report::{Outcome, ReportLine};
use crate::rewrite::{Mapped, Rewrite};

/// A row that can move, and where to: its object's key now and after, and the value
/// the row gets (the key itself, unless the [`Reference`] says otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub row: Row,
    pub src_key: String,
    pub dst_key: String,
    pub new_value: String,
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
pub fn plan_batch(rows: Vec<Row>, rewrite: &Rewrite, reference: &Reference) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut claimed: HashMap<String, String> = HashMap::new();
    for row in rows {
        let skip = |row: Row, outcome, new_path, detail| ReportLine {
            detail,
            id: row.id,
            old_path: row.path,
            new_path,
            outcome,
        };
        let src_key = match reference.key_of(&row.path) {
            Ok(k) => k,
            Err(why) => {
                plan.skipped
                    .push(skip(row, Outcome::InvalidKey, String::new(), why));
                continue;
            }
        };
        match rewrite.map(&src_key) {
            Mapped::To(dst_key) => {
                let new_value = reference.value_for(&row.path, &src_key, &dst_key);
                match claimed.get(&dst_key) {
                    Some(src) if *src != src_key => plan.skipped.push(skip(
                        row,
                        Outcome::Collision,
                        new_value,
                        format!("{src:?} maps to the same destination key"),
                    )),
                    _ => {
                        claimed.insert(dst_key.clone(), src_key.clone());
                        plan.moves.push(Move {
                            row,
                            src_key,
                            dst_key,
                            new_value,
                        });
                    }
                }
            }
            Mapped::Unmatched => plan.skipped.push(skip(
                row,
                Outcome::Unmatched,
                String::new(),
                "--rewrite does not match this path".into(),
            )),
            Mapped::Invalid(e) => {
                plan.skipped
                    .push(skip(row, Outcome::InvalidKey, String::new(), e.to_string()))
            }
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
        .filter(|m| seen.insert((m.src_key.as_str(), m.dst_key.as_str())))
        .map(|m| (m.src_key.clone(), m.dst_key.clone()))
        .collect()
}

/// Rows whose pair is ready, with whether relocator created the copy; report lines for
/// the others. Shared by `run` and `plan`, so both classify alike.
pub fn split_ready<'m>(
    moves: &'m [Move],
    by_pair: &HashMap<(&str, &str), PairResult>,
    src_bucket: &str,
) -> (Vec<(&'m Move, Made)>, Vec<ReportLine>) {
    let mut ready = Vec::new();
    let mut lines = Vec::new();
    for m in moves {
        let (outcome, detail) = match &by_pair[&(m.src_key.as_str(), m.dst_key.as_str())] {
            PairResult::Ready {
                created,
                size,
                src_etag,
                src_version,
                dst_etag,
            } => {
                ready.push((
                    m,
                    Made {
                        created: *created,
                        src_etag: src_etag.clone(),
                        src_version: src_version.clone(),
                        size: *size,
                        dst_etag: dst_etag.clone(),
                    },
                ));
                continue;
            }
            PairResult::MissingSource => (
                Outcome::MissingSource,
                format!("no object s3://{src_bucket}/{}", m.src_key),
            ),
            PairResult::Conflict(d) => (Outcome::Conflict, d.clone()),
            PairResult::Collision(d) => (Outcome::Collision, d.clone()),
            PairResult::Rejected(d) => (Outcome::Error, d.clone()),
        };
        lines.push(attention(m, outcome, detail));
    }
    (ready, lines)
}

pub fn attention(m: &Move, outcome: Outcome, detail: String) -> ReportLine {
    ReportLine {
        id: m.row.id.clone(),
        old_path: m.row.path.clone(),
        new_path: m.new_value.clone(),
        outcome,
        detail,
    }
}

/// The report line of a row that moved (or, `dry_run`, would move).
pub fn moved_line(m: &Move, created: bool, dry_run: bool) -> ReportLine {
    let detail = match (created, dry_run) {
        (true, false) => "copied",
        (false, false) => "an identical object was already at the destination",
        (true, true) => "would copy",
        (false, true) => "an identical object is already at the destination",
    };
    ReportLine {
        id: m.row.id.clone(),
        old_path: m.row.path.clone(),
        new_path: m.new_value.clone(),
        outcome: Outcome::Moved,
        detail: detail.into(),
    }
}

/// The destinations earlier batches of a `plan` would have filled, so that `plan`
/// predicts a collision across batches the way `run` detects it (the destination exists
/// and differs; the run's claims in the ledger say who filled it). It holds one batch's
/// worth: `plan` keeps the claims of all batches in the database and loads those on the
/// batch's destination keys ([`Claims::earlier`]), then stores the batch's new ones
/// ([`Claims::into_new`]), so its memory does not grow with the table.
#[derive(Debug, Default)]
pub struct Claims {
    /// Destination key → the source that filled it.
    known: HashMap<String, String>,
    new: Vec<(String, String)>,
}

impl Claims {
    /// Claims made by earlier batches, as `(destination, source)`.
    pub fn earlier(claims: impl IntoIterator<Item = (String, String)>) -> Claims {
        Claims {
            known: claims.into_iter().collect(),
            new: Vec::new(),
        }
    }

    /// What `run` would find for the pair (`src`, `dst`) that the copy stage judged `r`:
    /// a destination an earlier batch's other source fills is a collision; a ready pair
    /// claims its destination for the batches after it.
    pub fn judge(&mut self, src: &str, dst: &str, r: PairResult) -> PairResult {
        match (self.known.get(dst), r) {
            (Some(other), PairResult::Ready { .. } | PairResult::Conflict(_)) if other != src => {
                PairResult::Collision(format!("{other:?} maps to the same destination key"))
            }
            (known, r) => {
                if known.is_none() && matches!(r, PairResult::Ready { .. }) {
                    self.known.insert(dst.to_owned(), src.to_owned());
                    self.new.push((dst.to_owned(), src.to_owned()));
                }
                r
            }
        }
    }

    /// The claims judged here that were not known before, as `(destination, source)`.
    pub fn into_new(self) -> Vec<(String, String)> {
        self.new
    }
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
            &Reference::keys(),
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
            &Reference::keys(),
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
            &Reference::keys(),
        );
        assert_eq!(p.moves.len(), 1);
        let outcomes: Vec<_> = p.skipped.iter().map(|l| l.outcome).collect();
        assert_eq!(outcomes, [Outcome::Unmatched, Outcome::InvalidKey]);
    }

    fn ready() -> PairResult {
        PairResult::Ready {
            created: true,
            size: 3,
            src_etag: "e".into(),
            src_version: None,
            dst_etag: "e".into(),
        }
    }

    #[test]
    fn rows_split_into_ready_moves_and_report_lines() {
        let moves = vec![
            Move {
                row: row(1, "image/a.png"),
                src_key: "image/a.png".into(),
                dst_key: "avatar/a.png".into(),
                new_value: "avatar/a.png".into(),
            },
            Move {
                row: row(2, "image/b.png"),
                src_key: "image/b.png".into(),
                dst_key: "avatar/b.png".into(),
                new_value: "avatar/b.png".into(),
            },
            Move {
                row: row(3, "image/a.png"),
                src_key: "image/a.png".into(),
                dst_key: "avatar/a.png".into(),
                new_value: "avatar/a.png".into(),
            },
        ];
        let by_pair = HashMap::from([
            (("image/a.png", "avatar/a.png"), ready()),
            (("image/b.png", "avatar/b.png"), PairResult::MissingSource),
        ]);
        let (ready, lines) = split_ready(&moves, &by_pair, "legacy");
        let ids: Vec<&str> = ready.iter().map(|(m, _)| m.row.id.as_str()).collect();
        assert_eq!(ids, ["1", "3"], "both rows sharing the object move");
        assert!(ready.iter().all(|(_, made)| made.created && made.size == 3));
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].outcome, Outcome::MissingSource);
        assert_eq!(lines[0].detail, "no object s3://legacy/image/b.png");
    }

    #[test]
    fn plan_predicts_collisions_across_batches() {
        let mut claims = Claims::default();
        assert_eq!(
            claims.judge("image/a.png", "avatar/x.png", ready()),
            ready()
        );
        // The same source again (a shared object): no collision.
        assert_eq!(
            claims.judge("image/a.png", "avatar/x.png", ready()),
            ready()
        );
        // Another source onto the destination a ready pair filled: what run would find
        // there is the first source's copy, a collision (not a conflict).
        for later in [ready(), PairResult::Conflict("differs".into())] {
            assert!(matches!(
                claims.judge("image/b.png", "avatar/x.png", later),
                PairResult::Collision(d) if d.contains("image/a.png")
            ));
        }
        // A pair that was not ready claims nothing.
        assert_eq!(
            claims.judge("image/c.png", "avatar/y.png", PairResult::MissingSource),
            PairResult::MissingSource
        );
        assert_eq!(
            claims.judge("image/d.png", "avatar/y.png", ready()),
            ready()
        );
        let mut new = claims.into_new();
        new.sort();
        assert_eq!(
            new,
            [
                ("avatar/x.png".to_owned(), "image/a.png".to_owned()),
                ("avatar/y.png".to_owned(), "image/d.png".to_owned())
            ]
        );
        // A later batch that loads them judges the same.
        let mut later = Claims::earlier(new);
        assert!(matches!(
            later.judge("image/b.png", "avatar/x.png", ready()),
            PairResult::Collision(_)
        ));
        assert!(later.into_new().is_empty());
    }
}
