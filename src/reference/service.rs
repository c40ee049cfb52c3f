//! The service shape (`--service-column`, Rails Active Storage's `(key, service_name)`):
//! a second column names the bucket the key is in. A row is on the source side when it
//! holds `--source-service`; a move sets `--dest-service` in the same compare-and-swap as
//! the key, which may stay the same — the rows tell the buckets apart, so the prefixes
//! may overlap across two buckets.
//!
//! Which rows may use an object depends on its bucket: every row holding its key, except
//! a row of the other side's service (its key names the other bucket). A row of a third
//! service is counted (its bucket is unknown to relocator), so such an object is kept.
//! With one bucket for both services every row holding the key counts.

use super::{literal, Shape};
use crate::config::{quote_ident, ServiceColumn};
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Service {
    /// The column, quoted.
    column: String,
    /// `--source-service` and `--dest-service` as SQL literals.
    source: String,
    dest: String,
    /// The buckets of `--source` and `--dest`, with the service each one's rows hold.
    source_bucket: (String, String),
    dest_bucket: (String, String),
}

impl Service {
    pub(super) fn new(s: &ServiceColumn, source: &str, dest: &str) -> Service {
        Service {
            column: quote_ident(&s.column),
            source: literal(&s.source),
            dest: literal(&s.dest),
            source_bucket: (source.to_owned(), s.source.clone()),
            dest_bucket: (dest.to_owned(), s.dest.clone()),
        }
    }

    fn value(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.source,
            Side::Dest => &self.dest,
        }
    }
}

impl Shape for Service {
    fn on(&self, side: Side, t: &str) -> String {
        format!(" AND {t}.{} = {}", self.column, self.value(side))
    }

    fn set(&self, side: Side) -> String {
        format!(", {} = {}", self.column, self.value(side))
    }

    fn may_use(&self, t: &str) -> String {
        format!(
            " AND ($2::text IS NULL OR {t}.{} IS DISTINCT FROM $2::text)",
            self.column
        )
    }

    fn not_using(&self, bucket: &str) -> Option<&str> {
        if self.source_bucket.0 == self.dest_bucket.0 {
            return None;
        }
        if bucket == self.source_bucket.0 {
            Some(&self.dest_bucket.1)
        } else if bucket == self.dest_bucket.0 {
            Some(&self.source_bucket.1)
        } else {
            None
        }
    }

    fn column(&self, side: Side) -> Option<(&str, &str)> {
        Some((&self.column, self.value(side)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dest_bucket: &str) -> Service {
        Service::new(
            &ServiceColumn {
                column: "service_name".into(),
                source: "legacy".into(),
                dest: "it's\\prod".into(),
            },
            "old",
            dest_bucket,
        )
    }

    #[test]
    fn the_service_is_guarded_and_set_with_the_key() {
        let r = service("new");
        assert_eq!(
            r.on(Side::Source, "t"),
            " AND t.\"service_name\" = E'legacy'"
        );
        assert_eq!(r.set(Side::Dest), ", \"service_name\" = E'it''s\\\\prod'");
    }

    #[test]
    fn an_object_is_not_used_by_the_other_sides_rows() {
        let r = service("new");
        assert_eq!(r.not_using("old"), Some("it's\\prod"));
        assert_eq!(r.not_using("new"), Some("legacy"));
        // A third bucket's object, and one bucket for both services: every row holding
        // the key may use it.
        assert_eq!(r.not_using("third"), None);
        assert_eq!(service("old").not_using("old"), None);
    }
}
