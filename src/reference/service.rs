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

use super::{key, literal, whole, Moving, NoKey, Shape, Slot};
use crate::config::{quote_ident, ServiceColumn};
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Service {
    /// The path column, quoted.
    path: String,
    /// The key prefixes of `--source` and `--dest`.
    prefixes: (String, String),
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
    pub(super) fn new(
        s: &ServiceColumn,
        path: String,
        (source_prefix, dest_prefix): (&str, &str),
        (source, dest): (&str, &str),
    ) -> Service {
        Service {
            path,
            prefixes: (source_prefix.to_owned(), dest_prefix.to_owned()),
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
    fn selects(&self, side: Side, t: &str) -> String {
        key::selects(&self.path, &self.prefixes, side, t) + &self.on(side, t)
    }

    fn on(&self, side: Side, t: &str) -> String {
        format!(" AND {t}.{} = {}", self.column, self.value(side))
    }

    fn set(&self, side: Side) -> String {
        format!(", {} = {}", self.column, self.value(side))
    }

    fn value(&self, t: &str) -> String {
        key::value(&self.path, t)
    }

    fn holds(&self, t: &str, v: &str) -> String {
        key::holds(&self.path, t, v)
    }

    fn assign(&self, v: &str) -> String {
        key::assign(&self.path, v)
    }

    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        Ok(whole(value.to_owned()))
    }

    fn value_for(&self, _old: &str, moving: &[Moving<'_>]) -> String {
        moving
            .first()
            .map_or_else(String::new, |m| m.new_key.to_owned())
    }

    fn key_bytes(&self, _side: Side, t: &str) -> Vec<String> {
        key::key_bytes(&self.path, t)
    }

    /// Every row holding the key, except one of the service in `$2` (the other side's).
    fn referenced(&self, tbl: &str) -> String {
        let path = &self.path;
        format!(
            "SELECT t.{path}::text FROM {tbl} AS t WHERE t.{path} = ANY ($1::text[])
                AND ($2::text IS NULL OR t.{} IS DISTINCT FROM $2::text)",
            self.column
        )
    }

    fn takes_param(&self) -> bool {
        true
    }

    fn param(&self, bucket: &str) -> Option<&str> {
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

    fn values_are_keys(&self) -> bool {
        true
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
            "\"key\"".into(),
            ("", ""),
            ("old", dest_bucket),
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
        assert_eq!(
            r.selects(Side::Source, "t"),
            "starts_with(t.\"key\", E'') AND t.\"service_name\" = E'legacy'"
        );
    }

    #[test]
    fn an_object_is_not_used_by_the_other_sides_rows() {
        let r = service("new");
        assert_eq!(r.param("old"), Some("it's\\prod"));
        assert_eq!(r.param("new"), Some("legacy"));
        // A third bucket's object, and one bucket for both services: every row holding
        // the key may use it.
        assert_eq!(r.param("third"), None);
        assert_eq!(service("old").param("old"), None);
    }
}
