//! What a row's reference is: how the job's columns point at an object, and so which
//! rows reference what on each side. Every statement on the job's table takes its
//! conditions on the reference from here — what selects a row, what a compare-and-swap
//! guards, what a rewrite sets, which rows may still use an object — and every key is
//! read from a row's value here, so the pipeline never spells a shape out itself.
//!
//! A row's *value* (what the path column holds) and its *key* (the object's) are two
//! things: the compare-and-swap, the rewrite and the report are on values; copies,
//! deletes, reservations and the ledger's `old_path`/`new_path` are on keys.
//!
//! One file per shape, each a [`Shape`]:
//! - [`key`] (the default): the path column holds the object's key; the bucket is the
//!   job's, `--source`'s before the move and `--dest`'s after it.
//! - [`service`] (`--service-column`, Rails Active Storage's `(key, service_name)`): a
//!   second column names the bucket, and a move rewrites it with the key.
//! - [`url`] (`--source-url`/`--dest-url`): the path column holds a URL whose path,
//!   percent-decoded, is the key.
//! - [`json`] (`--json-key`, Shrine's attachment data): a `json`/`jsonb` document whose
//!   fields hold keys — several references in one row, rewritten together.
//! - [`columns`] (`--path-column` repeated): several columns, each a key or (named by
//!   `--url-column`) a URL, all rewritten together.
//!
//! A new shape is a new file implementing [`Shape`], chosen in [`Reference::new`].

mod columns;
mod json;

pub use json::SESSION_SQL as JSON_SESSION_SQL;
mod key;
mod service;
mod url;

use std::fmt::Debug;
use std::sync::Arc;

use crate::config::{quote_ident, JobConfig};
use crate::s3::Side;

/// One reference a row's value holds: where in the value (empty for the value itself; a
/// JSON document's field path), and the object's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub at: String,
    pub key: String,
}

/// Why a selected row's value holds no reference that can move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// The value is of no location the options name (`unmatched`).
    Unmatched(String),
    /// The value cannot be read (`invalid_key`).
    Invalid(String),
}

impl From<String> for NoKey {
    fn from(why: String) -> NoKey {
        NoKey::Invalid(why)
    }
}

/// A reference that moves: where in the value, and the key it gets.
#[derive(Debug, Clone, Copy)]
pub struct Moving<'a> {
    pub at: &'a str,
    pub new_key: &'a str,
}

/// One shape of reference, as SQL fragments on a row of the job's table and as the
/// arithmetic between a row's value and its keys. `t` is the row's table alias (or the
/// table's quoted name).
trait Shape: Debug + Send + Sync {
    /// The condition that selects row `t` as one on `side`: its value holds a reference
    /// under `side`'s location.
    fn selects(&self, side: Side, t: &str) -> String;

    /// Appended to a compare-and-swap on row `t`'s value: the row is on `side`. Nothing
    /// where the value alone tells the sides apart.
    fn on(&self, _side: Side, _t: &str) -> String {
        String::new()
    }

    /// Appended to an UPDATE's SET list: the row's reference becomes `side`'s. Nothing
    /// where the value is all of it.
    fn set(&self, _side: Side) -> String {
        String::new()
    }

    /// Row `t`'s value, as text.
    fn value(&self, t: &str) -> String;

    /// The condition that row `t` holds the value `v` (an SQL text expression).
    fn holds(&self, t: &str, v: &str) -> String;

    /// An UPDATE's SET list making the row's value `v` (an SQL text expression).
    fn assign(&self, v: &str) -> String;

    /// The references to source objects a selected row's value holds (at least one), or
    /// why it holds none that can be read.
    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey>;

    /// The value a row that held `old` gets when these of its references move.
    fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String;

    /// Row `t`'s keys on `side`, each an expression of type `bytea` (UTF-8), NULL where
    /// the row holds none there: what `verify` merges with a listing, in this order.
    fn key_bytes(&self, side: Side, t: &str) -> Vec<String>;

    /// The reference check's statement on the table `tbl`: which of the keys `$1` some row
    /// may still use an object at. It reads `$2` ([`Shape::param`]) when
    /// [`Shape::takes_param`].
    fn referenced(&self, tbl: &str) -> String;

    /// Whether [`Shape::referenced`] reads `$2`.
    fn takes_param(&self) -> bool {
        false
    }

    /// The `$2` of [`Shape::referenced`] for an object in `bucket`.
    fn param(&self, _bucket: &str) -> Option<&str> {
        None
    }

    /// A further column the shape rewrites, quoted, with the SQL literal it holds on
    /// `side`.
    fn column(&self, _side: Side) -> Option<(&str, &str)> {
        None
    }

    /// Whether the value is the key itself (an index on the column then finds the rows
    /// of a key).
    fn values_are_keys(&self) -> bool {
        false
    }

    /// The columns (quoted) [`Shape::referenced`] reads whole, whatever their indexes (a
    /// key inside a URL or a document): each cleanup batch then scans the table.
    fn scanned_columns(&self) -> Vec<String> {
        Vec::new()
    }

    /// Where the value is several columns' (the columns shape): each column's name and
    /// value. `None` where the value is one column's.
    fn parts(&self, _value: &str) -> Option<Vec<(String, Option<String>)>> {
        None
    }
}

/// How the job's rows point at their objects: the job's [`Shape`].
#[derive(Debug, Clone)]
pub struct Reference(Arc<dyn Shape>);

impl Reference {
    /// The shape the job's options name, on a path column of type `path_type`.
    pub fn new(cfg: &JobConfig, path_type: &str) -> Reference {
        let path = quote_ident(&cfg.path_column);
        let prefixes = (&cfg.source.prefix[..], &cfg.dest.prefix[..]);
        if let Some(s) = &cfg.service {
            return Reference(Arc::new(service::Service::new(
                s,
                path,
                prefixes,
                (&cfg.source.bucket, &cfg.dest.bucket),
            )));
        }
        if !cfg.more_columns.is_empty() {
            // In one order however they were given: the ledger keeps values in it.
            let each = cfg
                .columns()
                .into_iter()
                .map(|name| {
                    let path = quote_ident(&name);
                    let shape: Box<dyn Shape> = match &cfg.urls {
                        Some(u) if u.columns.contains(&name) => Box::new(url::Url::new(
                            u,
                            path,
                            prefixes,
                            (&cfg.source.bucket, &cfg.dest.bucket),
                        )),
                        _ => Box::new(key::Key::new(path, prefixes)),
                    };
                    columns::Column { name, shape }
                })
                .collect();
            return Reference(Arc::new(columns::Columns::new(each)));
        }
        if let Some(j) = &cfg.json {
            let form = match path_type {
                "jsonb" => json::Form::Jsonb,
                "json" => json::Form::Json,
                _ => json::Form::Text,
            };
            return Reference(Arc::new(json::Json::new(j, path, form, prefixes)));
        }
        if let Some(u) = &cfg.urls {
            return Reference(Arc::new(url::Url::new(
                u,
                path,
                prefixes,
                (&cfg.source.bucket, &cfg.dest.bucket),
            )));
        }
        Reference(Arc::new(key::Key::new(path, prefixes)))
    }

    /// The key shape on a column `path`, with no prefixes (for tests of what is built on
    /// it).
    #[cfg(test)]
    pub(crate) fn keys() -> Reference {
        Reference(Arc::new(key::Key::new("\"path\"".into(), ("", ""))))
    }

    /// The condition that selects row `t` as one on `side`.
    pub fn selects(&self, side: Side, t: &str) -> String {
        self.0.selects(side, t)
    }

    /// SQL to append to a compare-and-swap on the value of row `t`: the row is on `side`.
    pub fn on(&self, side: Side, t: &str) -> String {
        self.0.on(side, t)
    }

    /// SQL to append to an UPDATE's SET list that makes the row's reference `side`'s.
    pub fn set(&self, side: Side) -> String {
        self.0.set(side)
    }

    /// Row `t`'s value, as text.
    pub fn value(&self, t: &str) -> String {
        self.0.value(t)
    }

    /// The condition that row `t` holds the value `v` (an SQL text expression).
    pub fn holds(&self, t: &str, v: &str) -> String {
        self.0.holds(t, v)
    }

    /// An UPDATE's SET list making the row's value `v` (an SQL text expression).
    pub fn assign(&self, v: &str) -> String {
        self.0.assign(v)
    }

    /// The references to source objects a selected row's value holds, or why none can
    /// be read.
    pub fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        self.0.keys_of(value)
    }

    /// The value a row that held `old` gets when these of its references move.
    pub fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String {
        self.0.value_for(old, moving)
    }

    /// Row `t`'s keys on `side` as `bytea` expressions (NULL where none), in the order of
    /// a listing.
    pub fn key_bytes(&self, side: Side, t: &str) -> Vec<String> {
        self.0.key_bytes(side, t)
    }

    /// The reference check on `tbl`: `$1` keys, `$2` [`Reference::param`].
    pub fn referenced(&self, tbl: &str) -> String {
        self.0.referenced(tbl)
    }

    /// The `$2` of [`Reference::referenced`] for an object in `bucket`.
    pub fn param(&self, bucket: &str) -> Option<&str> {
        self.0.param(bucket)
    }

    /// Whether [`Reference::referenced`] takes the parameter `$2`.
    pub fn takes_param(&self) -> bool {
        self.0.takes_param()
    }

    /// Whether a row's value is its key.
    pub fn values_are_keys(&self) -> bool {
        self.0.values_are_keys()
    }

    /// Whether the reference check reads a whole column, whatever its indexes.
    pub fn reads_whole_column(&self) -> bool {
        !self.0.scanned_columns().is_empty()
    }

    /// The columns (quoted) the reference check reads whole.
    pub fn scanned_columns(&self) -> Vec<String> {
        self.0.scanned_columns()
    }

    /// With several columns: each column's name and value in the row's value `v`.
    pub fn parts(&self, v: &str) -> Option<Vec<(String, Option<String>)>> {
        self.0.parts(v)
    }

    /// The further column the shape rewrites (the service column), quoted.
    pub fn service_column(&self) -> Option<&str> {
        self.0.column(Side::Dest).map(|(c, _)| c)
    }

    /// What that column holds on `side`, as an SQL literal.
    pub fn service_value(&self, side: Side) -> Option<&str> {
        self.0.column(side).map(|(_, v)| v)
    }
}

/// `s` as an SQL string literal, whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The one reference of a value that is a reference (the key and URL shapes).
fn whole(key: String) -> Vec<Slot> {
    vec![Slot {
        at: String::new(),
        key,
    }]
}

/// The condition that row `t`'s column `path` starts with `prefix`.
fn under(t: &str, path: &str, prefix: &str) -> String {
    format!("starts_with({t}.{path}, {})", literal(prefix))
}
