//! What a row's reference is: how the job's columns point at an object, and so which
//! rows reference what on each side. Every statement on the job's table takes its
//! conditions on the reference from here — what selects a row, what a compare-and-swap
//! guards, what a rewrite sets, which rows still use a source object.
//!
//! Two shapes so far:
//! - **the key** (the default): the path column holds the object's key; the bucket is
//!   the job's, `--source`'s before the move and `--dest`'s after it. The key alone tells
//!   the sides apart, which is why their prefixes may not overlap.
//! - **the key and a service** (`--service-column`, Rails Active Storage's
//!   `(key, service_name)`): a second column names the bucket. A row is on the source
//!   side when it holds `--source-service`, and a move sets `--dest-service` in the same
//!   compare-and-swap as the key — which may stay the same.

use crate::config::{quote_ident, ServiceColumn};
use crate::s3::Side;

/// How the job's rows point at their objects, as SQL on the job's table.
#[derive(Debug, Clone)]
pub struct Reference {
    service: Option<Service>,
}

#[derive(Debug, Clone)]
struct Service {
    /// The column, quoted.
    column: String,
    /// `--source-service` and `--dest-service` as SQL literals.
    source: String,
    dest: String,
    /// The buckets of `--source` and `--dest`, with the service each one's rows hold.
    source_bucket: (String, String),
    dest_bucket: (String, String),
}

impl Reference {
    /// The reference of a job moving from bucket `source` to bucket `dest`.
    pub fn new(service: Option<&ServiceColumn>, source: &str, dest: &str) -> Reference {
        Reference {
            service: service.map(|s| Service {
                column: quote_ident(&s.column),
                source: literal(&s.source),
                dest: literal(&s.dest),
                source_bucket: (source.to_owned(), s.source.clone()),
                dest_bucket: (dest.to_owned(), s.dest.clone()),
            }),
        }
    }

    /// The service whose rows cannot use an object in `bucket` (they hold the same key
    /// in the other bucket of the job), if any: the parameter of [`Reference::may_use`].
    /// With one bucket on both sides, or a bucket that is neither side's, every row
    /// holding the key may use it.
    pub fn not_using(&self, bucket: &str) -> Option<&str> {
        let s = self.service.as_ref()?;
        if s.source_bucket.0 == s.dest_bucket.0 {
            return None;
        }
        if bucket == s.source_bucket.0 {
            Some(&s.dest_bucket.1)
        } else if bucket == s.dest_bucket.0 {
            Some(&s.source_bucket.1)
        } else {
            None
        }
    }

    /// Whether [`Reference::may_use`] takes the parameter `$2`.
    pub fn checks_service(&self) -> bool {
        self.service.is_some()
    }

    /// The service column, quoted, if the rows name their bucket.
    pub fn service_column(&self) -> Option<&str> {
        self.service.as_ref().map(|s| s.column.as_str())
    }

    /// What `side`'s service column holds, as an SQL literal.
    pub fn service_value(&self, side: Side) -> Option<&str> {
        self.service.as_ref().map(|s| match side {
            Side::Source => s.source.as_str(),
            Side::Dest => s.dest.as_str(),
        })
    }

    /// SQL to append to a condition on the key of row `t` (a table alias, or the table's
    /// quoted name): the row's key is in `side`'s bucket. Empty for the key shape.
    pub fn on(&self, side: Side, t: &str) -> String {
        match self.service_value(side) {
            Some(v) => format!(
                " AND {t}.{} = {v}",
                self.service.as_ref().map_or("", |s| &s.column)
            ),
            None => String::new(),
        }
    }

    /// SQL to append to the cleanup's check whether row `t` still uses an object at a
    /// key it holds: every row holding the key does, except one of the service in `$2`
    /// (from [`Reference::not_using`] for the object's bucket; NULL: none). A row of a
    /// third service is counted (its bucket is unknown to relocator), so such an object
    /// is kept. Empty for the key shape, whose statement has no `$2`.
    pub fn may_use(&self, t: &str) -> String {
        match &self.service {
            Some(s) => format!(
                " AND ($2::text IS NULL OR {t}.{} IS DISTINCT FROM $2::text)",
                s.column
            ),
            None => String::new(),
        }
    }

    /// SQL to append to an UPDATE's SET list that makes the row's key `side`'s: empty for
    /// the key shape, the service assignment for the service shape.
    pub fn set(&self, side: Side) -> String {
        match (&self.service, self.service_value(side)) {
            (Some(s), Some(v)) => format!(", {} = {v}", s.column),
            _ => String::new(),
        }
    }
}

/// `s` as an SQL string literal, whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dest_bucket: &str) -> Reference {
        Reference::new(
            Some(&ServiceColumn {
                column: "service_name".into(),
                source: "legacy".into(),
                dest: "it's\\prod".into(),
            }),
            "old",
            dest_bucket,
        )
    }

    #[test]
    fn the_key_shape_adds_nothing() {
        let r = Reference::new(None, "old", "new");
        assert_eq!(r.on(Side::Source, "t"), "");
        assert_eq!(r.may_use("t"), "");
        assert_eq!(r.set(Side::Dest), "");
        assert_eq!(r.service_column(), None);
        assert_eq!(r.not_using("old"), None);
    }

    #[test]
    fn the_service_shape_guards_and_sets_the_service() {
        let r = service("new");
        assert_eq!(
            r.on(Side::Source, "t"),
            " AND t.\"service_name\" = E'legacy'"
        );
        assert_eq!(r.set(Side::Dest), ", \"service_name\" = E'it''s\\\\prod'");
        // An object in one bucket is not used by the rows on the other bucket's side; a
        // third bucket's, and one bucket for both services, by every row holding the key.
        assert_eq!(r.not_using("old"), Some("it's\\prod"));
        assert_eq!(r.not_using("new"), Some("legacy"));
        assert_eq!(r.not_using("third"), None);
        assert_eq!(service("old").not_using("old"), None);
    }
}
