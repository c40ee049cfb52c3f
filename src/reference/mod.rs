//! What a row's reference is: how the job's columns point at an object, and so which
//! rows reference what on each side. Every statement on the job's table takes its
//! conditions on the reference from here — what selects a row, what a compare-and-swap
//! guards, what a rewrite sets, which rows may still use an object — so the pipeline
//! never spells a shape out itself.
//!
//! One file per shape, each a [`Shape`]:
//! - [`key`] (the default): the path column holds the object's key; the bucket is the
//!   job's, `--source`'s before the move and `--dest`'s after it.
//! - [`service`] (`--service-column`, Rails Active Storage's `(key, service_name)`): a
//!   second column names the bucket, and a move rewrites it with the key.
//!
//! A new shape is a new file implementing [`Shape`], chosen in [`Reference::new`].

mod key;
mod service;

use std::fmt::Debug;
use std::sync::Arc;

use crate::config::JobConfig;
use crate::s3::Side;

/// One shape of reference, as SQL fragments on a row of the job's table. `t` is the
/// row's table alias (or the table's quoted name).
trait Shape: Debug + Send + Sync {
    /// Appended to a condition on row `t`'s key: the row's key is in `side`'s bucket.
    fn on(&self, side: Side, t: &str) -> String;

    /// Appended to an UPDATE's SET list: the row's key becomes `side`'s.
    fn set(&self, side: Side) -> String;

    /// Appended to the cleanup's check that row `t`, holding the key, may still use the
    /// object: the rows that cannot are those of the value in `$2`
    /// ([`Shape::not_using`]). Empty when every row holding the key may use it; the
    /// statement then has no `$2`.
    fn may_use(&self, t: &str) -> String;

    /// The `$2` of [`Shape::may_use`] for an object in `bucket`; `None` for none.
    fn not_using(&self, bucket: &str) -> Option<&str>;

    /// A further column the shape rewrites, quoted, with the SQL literal it holds on
    /// `side`.
    fn column(&self, side: Side) -> Option<(&str, &str)>;
}

/// How the job's rows point at their objects: the job's [`Shape`].
#[derive(Debug, Clone)]
pub struct Reference(Arc<dyn Shape>);

impl Reference {
    /// The shape the job's options name.
    pub fn new(cfg: &JobConfig) -> Reference {
        match &cfg.service {
            Some(s) => Reference(Arc::new(service::Service::new(
                s,
                &cfg.source.bucket,
                &cfg.dest.bucket,
            ))),
            None => Reference(Arc::new(key::Key)),
        }
    }

    /// SQL to append to a condition on the key of row `t`: the row's key is in `side`'s
    /// bucket.
    pub fn on(&self, side: Side, t: &str) -> String {
        self.0.on(side, t)
    }

    /// SQL to append to an UPDATE's SET list that makes the row's key `side`'s.
    pub fn set(&self, side: Side) -> String {
        self.0.set(side)
    }

    /// SQL to append to the cleanup's check whether row `t` still uses an object at a
    /// key it holds; it reads `$2` when [`Reference::checks_service`].
    pub fn may_use(&self, t: &str) -> String {
        self.0.may_use(t)
    }

    /// The `$2` of [`Reference::may_use`] for an object in `bucket`.
    pub fn not_using(&self, bucket: &str) -> Option<&str> {
        self.0.not_using(bucket)
    }

    /// Whether [`Reference::may_use`] takes the parameter `$2`.
    pub fn checks_service(&self) -> bool {
        !self.0.may_use("t").is_empty()
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
