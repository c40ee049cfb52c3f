//! Planning a batch, without I/O: the destination key of every selected row, the rows
//! that cannot move (unmatched, invalid key, collision), and the outcome of each row once
//! the copy stage has judged its pair ([`split_ready`]). `run` and `plan` share it, which
//! is what lets `plan` predict exactly what `run` does.

use std::collections::HashMap;

use super::copy::{Made, PairResult};
use crate::db::Row;
use crate::reference::{Moving, NoKey, Reference, Slot};
use crate::report::{Outcome, ReportLine};
use crate::rewrite::{Mapped, Rewrite};

/// One reference of a row that can move, and where to: its object's key now and after,
/// and the value the row gets (the key itself, unless the [`Reference`] says otherwise).
/// A row holding several references (a JSON document's fields) has one `Move` each, all
/// with the same `new_value`: the row is rewritten once, only when every one of them is
/// ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub row: Row,
    /// Where in the row's value the reference is (empty: the value itself).
    pub at: String,
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

/// `detail`, naming the reference of the row it is about when the row has several.
fn about(at: &str, detail: String) -> String {
    if at.is_empty() {
        detail
    } else {
        format!("{at}: {detail}")
    }
}

/// Plan one batch. Rows arrive in id order; when two rows with different sources map to
/// one destination key, the first keeps it and the others are `collision`s (rows sharing
/// one source, like a default avatar, all move: it is one object). A row moves only when
/// every reference it holds can: otherwise each is reported, those that could move as
/// `held_back`.
pub fn plan_batch(rows: Vec<Row>, rewrite: &Rewrite, reference: &Reference) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut claimed: HashMap<String, String> = HashMap::new();
    for row in rows {
        let line = |at: &str, outcome, new_path: String, detail: String| ReportLine {
            detail: about(at, detail),
            id: row.id.clone(),
            old_path: row.path.clone(),
            new_path,
            outcome,
        };
        let slots = match reference.keys_of(&row.path) {
            Ok(s) => s,
            Err(NoKey::Unmatched(why)) => {
                plan.skipped
                    .push(line("", Outcome::Unmatched, String::new(), why));
                continue;
            }
            Err(NoKey::Invalid(why)) => {
                plan.skipped
                    .push(line("", Outcome::InvalidKey, String::new(), why));
                continue;
            }
        };
        let mut mapped: Vec<(Slot, String)> = Vec::new();
        // References to an object another reference of the row already moves: (where,
        // destination). Rewritten with it, without a move of their own.
        let mut again: Vec<(String, String)> = Vec::new();
        let mut failed = Vec::new();
        for slot in slots {
            match rewrite.map(&slot.key) {
                Mapped::To(dst) => {
                    // Another row's, or another reference of this row's, source there.
                    let taken = claimed
                        .get(&dst)
                        .or_else(|| mapped.iter().find(|(_, d)| *d == dst).map(|(s, _)| &s.key));
                    match taken {
                        Some(src) if *src != slot.key => failed.push(line(
                            &slot.at,
                            Outcome::Collision,
                            String::new(),
                            format!("{src:?} maps to the same destination key"),
                        )),
                        // The same object at two places in the row: one move, one line.
                        Some(_) if mapped.iter().any(|(s, d)| *d == dst && s.key == slot.key) => {
                            again.push((slot.at, dst));
                        }
                        _ => mapped.push((slot, dst)),
                    }
                }
                Mapped::Unmatched => failed.push(line(
                    &slot.at,
                    Outcome::Unmatched,
                    String::new(),
                    "--rewrite does not match this path".into(),
                )),
                Mapped::Invalid(e) => failed.push(line(
                    &slot.at,
                    Outcome::InvalidKey,
                    String::new(),
                    e.to_string(),
                )),
            }
        }
        if !failed.is_empty() {
            for (slot, _) in &mapped {
                plan.skipped.push(line(
                    &slot.at,
                    Outcome::HeldBack,
                    String::new(),
                    "another reference of the row cannot move; the row is left as it is".into(),
                ));
            }
            plan.skipped.extend(failed);
            continue;
        }
        let moving: Vec<Moving<'_>> = mapped
            .iter()
            .map(|(slot, dst)| (slot.at.as_str(), dst.as_str()))
            .chain(again.iter().map(|(at, dst)| (at.as_str(), dst.as_str())))
            .map(|(at, new_key)| Moving { at, new_key })
            .collect();
        let new_value = reference.value_for(&row.path, &moving);
        for (slot, dst_key) in mapped {
            claimed.insert(dst_key.clone(), slot.key.clone());
            // One line names every place of the row holding the object.
            let at = std::iter::once(slot.at.as_str())
                .chain(
                    again
                        .iter()
                        .filter(|(_, d)| *d == dst_key)
                        .map(|(a, _)| a.as_str()),
                )
                .collect::<Vec<_>>()
                .join(" and ");
            plan.moves.push(Move {
                row: row.clone(),
                at,
                src_key: slot.key,
                dst_key,
                new_value: new_value.clone(),
            });
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

/// How a batch's moves came out of the copy stage ([`split_ready`]).
pub struct Split<'m> {
    /// Moves whose pair is ready, with whether relocator created the copy.
    pub ready: Vec<(&'m Move, Made)>,
    /// Report lines for the others.
    pub lines: Vec<ReportLine>,
    /// Rows with a ready move and another that is not: not to be rewritten (their ready
    /// moves are in `ready`, so that the commit takes their copies back), with why.
    pub held: HashMap<String, String>,
}

/// The moves whose pair is ready, report lines for the others, and the rows that
/// cannot be rewritten because one of their references is not ready. Shared by `run`
/// and `plan`, so both classify alike.
pub fn split_ready<'m>(
    moves: &'m [Move],
    by_pair: &HashMap<(&str, &str), PairResult>,
    src_bucket: &str,
) -> Split<'m> {
    let mut ready = Vec::new();
    let mut lines = Vec::new();
    let mut held = HashMap::new();
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
        held.entry(m.row.id.clone()).or_insert_with(|| {
            format!(
                "{} is {}; the row is left as it is",
                if m.at.is_empty() {
                    "its reference"
                } else {
                    m.at.as_str()
                },
                outcome.as_str()
            )
        });
        lines.push(attention(m, outcome, detail));
    }
    held.retain(|id, _| ready.iter().any(|(m, _)| m.row.id == *id));
    Split { ready, lines, held }
}

pub fn attention(m: &Move, outcome: Outcome, detail: String) -> ReportLine {
    ReportLine {
        id: m.row.id.clone(),
        old_path: m.row.path.clone(),
        new_path: m.new_value.clone(),
        outcome,
        detail: about(&m.at, detail),
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
        detail: about(&m.at, detail.into()),
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
                at: String::new(),
                src_key: "image/a.png".into(),
                dst_key: "avatar/a.png".into(),
                new_value: "avatar/a.png".into(),
            },
            Move {
                row: row(2, "image/b.png"),
                at: String::new(),
                src_key: "image/b.png".into(),
                dst_key: "avatar/b.png".into(),
                new_value: "avatar/b.png".into(),
            },
            Move {
                row: row(3, "image/a.png"),
                at: String::new(),
                src_key: "image/a.png".into(),
                dst_key: "avatar/a.png".into(),
                new_value: "avatar/a.png".into(),
            },
        ];
        let by_pair = HashMap::from([
            (("image/a.png", "avatar/a.png"), ready()),
            (("image/b.png", "avatar/b.png"), PairResult::MissingSource),
        ]);
        let Split { ready, lines, held } = split_ready(&moves, &by_pair, "legacy");
        assert!(held.is_empty(), "each row has one reference");
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
