//! The key shape: the path column holds the object's whole key, and the bucket is the
//! job's — `--source`'s before the move, `--dest`'s after it. The key alone tells the
//! sides apart (which is why their prefixes may not overlap), so the shape adds nothing
//! to a compare-and-swap, and a row uses an object when it holds its key.

use super::{under, whole, Moving, NoKey, Shape, Slot};
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Key {
    /// The path column, quoted.
    path: String,
    /// The key prefixes of `--source` and `--dest`.
    prefixes: (String, String),
}

impl Key {
    pub(super) fn new(path: String, (source, dest): (&str, &str)) -> Key {
        Key {
            path,
            prefixes: (source.to_owned(), dest.to_owned()),
        }
    }
}

/// The key shape's statements, shared with the service shape (whose key is the
/// column's value too).
pub(super) fn selects(path: &str, prefixes: &(String, String), side: Side, t: &str) -> String {
    let prefix = match side {
        Side::Source => &prefixes.0,
        Side::Dest => &prefixes.1,
    };
    under(t, path, prefix)
}

pub(super) fn key_bytes(path: &str, t: &str) -> Vec<String> {
    vec![format!("convert_to({t}.{path}, 'UTF8')")]
}

pub(super) fn value(path: &str, t: &str) -> String {
    format!("{t}.{path}::text")
}

pub(super) fn holds(path: &str, t: &str, v: &str) -> String {
    format!("{t}.{path} = {v}")
}

pub(super) fn assign(path: &str, v: &str) -> String {
    format!("{path} = {v}")
}

impl Shape for Key {
    fn selects(&self, side: Side, t: &str) -> String {
        selects(&self.path, &self.prefixes, side, t)
    }

    fn value(&self, t: &str) -> String {
        value(&self.path, t)
    }

    fn holds(&self, t: &str, v: &str) -> String {
        holds(&self.path, t, v)
    }

    fn assign(&self, v: &str) -> String {
        assign(&self.path, v)
    }

    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        if !value.starts_with(&self.prefixes.0) {
            return Err(NoKey::Unmatched(
                "the value is not under --source's prefix".into(),
            ));
        }
        Ok(whole(value.to_owned()))
    }

    fn value_for(&self, _old: &str, moving: &[Moving<'_>]) -> String {
        moving
            .first()
            .map_or_else(String::new, |m| m.new_key.to_owned())
    }

    fn key_bytes(&self, _side: Side, t: &str) -> Vec<String> {
        key_bytes(&self.path, t)
    }

    fn referenced(&self, tbl: &str) -> String {
        let path = &self.path;
        format!("SELECT t.{path}::text FROM {tbl} AS t WHERE t.{path} = ANY ($1::text[])")
    }

    fn values_are_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_shape_adds_nothing_to_a_compare_and_swap() {
        let k = Key::new("\"path\"".into(), ("image/", "avatar/"));
        assert_eq!(k.on(Side::Source, "t"), "");
        assert_eq!(k.set(Side::Dest), "");
        assert_eq!(k.column(Side::Dest), None);
        assert_eq!(k.param("old"), None);
        assert_eq!(
            k.selects(Side::Dest, "t"),
            "starts_with(t.\"path\", E'avatar/')"
        );
        assert_eq!(k.keys_of("image/a b.png").unwrap()[0].key, "image/a b.png");
        let moving = [Moving {
            at: "",
            new_key: "avatar/a",
        }];
        assert_eq!(k.value_for("image/a", &moving), "avatar/a");
    }
}
