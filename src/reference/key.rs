//! The key shape: the path column holds the object's whole key, and the bucket is the
//! job's — `--source`'s before the move, `--dest`'s after it. The key alone tells the
//! sides apart (which is why their prefixes may not overlap), so the shape adds nothing
//! to a statement.

use super::Shape;
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Key;

impl Shape for Key {
    fn on(&self, _side: Side, _t: &str) -> String {
        String::new()
    }

    fn set(&self, _side: Side) -> String {
        String::new()
    }

    fn may_use(&self, _t: &str) -> String {
        String::new()
    }

    fn not_using(&self, _bucket: &str) -> Option<&str> {
        None
    }

    fn column(&self, _side: Side) -> Option<(&str, &str)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_shape_adds_nothing() {
        assert_eq!(Key.on(Side::Source, "t"), "");
        assert_eq!(Key.may_use("t"), "");
        assert_eq!(Key.set(Side::Dest), "");
        assert_eq!(Key.column(Side::Dest), None);
        assert_eq!(Key.not_using("old"), None);
    }
}
