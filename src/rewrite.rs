//! Pure key arithmetic: which path values a job selects and the key each one moves to.
//!
//! Nothing here does I/O, so every rule about keys is unit-tested here and fuzzed.

use regex::Regex;

/// S3's hard limit on key length, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key cannot be used. Each message says what is wrong; the row is reported with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key would be empty after the destination prefix")]
    Empty,
    #[error("the key is {0} bytes long; S3 allows at most 1024")]
    TooLong(usize),
    #[error("the key has a '.' or '..' path segment, which escapes the destination prefix")]
    DotSegment,
    #[error("the key contains a control character (byte {0:#04x})")]
    ControlChar(u32),
    #[error("the path starts with '/'; the column is expected to hold bare keys")]
    LeadingSlash,
}

/// What the rewrite makes of one selected path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// The destination key (destination prefix included), already validated.
    To(String),
    /// `--rewrite` was given and does not match this path: the row is left alone.
    Unmatched,
    /// The source or the resulting key is unusable.
    Invalid(KeyError),
}

/// The mapping from a source key to its destination key: swap the prefix and, optionally,
/// rewrite the remainder with a regex (first match replaced, `$1` / `${name}` expanded).
#[derive(Debug, Clone)]
pub struct Rewrite {
    source_prefix: String,
    dest_prefix: String,
    rule: Option<(Regex, String)>,
}

impl Rewrite {
    /// Prefixes must already be normalised (see [`crate::config::S3Location`]).
    pub fn new(source_prefix: &str, dest_prefix: &str, rule: Option<(Regex, String)>) -> Self {
        Rewrite {
            source_prefix: source_prefix.to_owned(),
            dest_prefix: dest_prefix.to_owned(),
            rule,
        }
    }

    pub fn source_prefix(&self) -> &str {
        &self.source_prefix
    }

    pub fn dest_prefix(&self) -> &str {
        &self.dest_prefix
    }

    /// A row is selected when its path starts with the source prefix.
    pub fn selects(&self, path: &str) -> bool {
        path.starts_with(&self.source_prefix)
    }

    /// The destination key for a selected `path`.
    pub fn map(&self, path: &str) -> Mapped {
        let Some(rest) = path.strip_prefix(&self.source_prefix) else {
            return Mapped::Unmatched;
        };
        if let Err(e) = validate_source(path) {
            return Mapped::Invalid(e);
        }
        let rest = match &self.rule {
            None => rest.to_owned(),
            Some((re, to)) => {
                if !re.is_match(rest) {
                    return Mapped::Unmatched;
                }
                re.replace(rest, to.as_str()).into_owned()
            }
        };
        match validate_remainder(&rest) {
            Ok(()) => {}
            Err(e) => return Mapped::Invalid(e),
        }
        let key = format!("{}{}", self.dest_prefix, rest);
        if key.len() > MAX_KEY_BYTES {
            return Mapped::Invalid(KeyError::TooLong(key.len()));
        }
        Mapped::To(key)
    }
}

/// A source path must be a usable bare key.
pub fn validate_source(path: &str) -> Result<(), KeyError> {
    if path.starts_with('/') {
        return Err(KeyError::LeadingSlash);
    }
    check_chars(path)
}

/// The part of a destination key after the destination prefix: non-empty, no control
/// characters, and no `.`/`..` segment that would let it climb out of the prefix.
pub fn validate_remainder(rest: &str) -> Result<(), KeyError> {
    if rest.is_empty() {
        return Err(KeyError::Empty);
    }
    if rest.starts_with('/') {
        return Err(KeyError::LeadingSlash);
    }
    if rest.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(KeyError::DotSegment);
    }
    if rest.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(rest.len()));
    }
    check_chars(rest)
}

fn check_chars(s: &str) -> Result<(), KeyError> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(KeyError::ControlChar(c as u32)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swap() -> Rewrite {
        Rewrite::new("image/", "avatar/", None)
    }

    #[test]
    fn prefix_swap_keeps_the_remainder_byte_for_byte() {
        let r = swap();
        for rest in ["avatar-1.png", "a b+c%20#d.png", "ünï/cødé.webp", "x/y/z"] {
            assert_eq!(
                r.map(&format!("image/{rest}")),
                Mapped::To(format!("avatar/{rest}"))
            );
        }
    }

    #[test]
    fn only_paths_under_the_source_prefix_are_selected() {
        let r = swap();
        assert!(r.selects("image/a.png"));
        assert!(!r.selects("images/a.png"));
        assert!(!r.selects("avatar/a.png"));
        assert_eq!(r.map("other/a.png"), Mapped::Unmatched);
    }

    #[test]
    fn regex_rewrite_expands_groups() {
        let re = Regex::new(r"^avatar-(?P<n>\d+)\.png$").unwrap();
        let r = Rewrite::new(
            "image/",
            "avatar/",
            Some((re, "u/${n}/original.png".into())),
        );
        assert_eq!(
            r.map("image/avatar-42.png"),
            Mapped::To("avatar/u/42/original.png".into())
        );
        assert_eq!(r.map("image/other.jpg"), Mapped::Unmatched);
    }

    #[test]
    fn rewrite_that_empties_or_escapes_is_invalid() {
        let re = Regex::new(r"^.*$").unwrap();
        let empty = Rewrite::new("image/", "avatar/", Some((re.clone(), String::new())));
        assert_eq!(empty.map("image/a"), Mapped::Invalid(KeyError::Empty));
        let up = Rewrite::new(
            "image/",
            "avatar/",
            Some((re.clone(), "../image/$0".into())),
        );
        assert_eq!(up.map("image/a"), Mapped::Invalid(KeyError::DotSegment));
        let dot = Rewrite::new("image/", "avatar/", Some((re, "x/./y".into())));
        assert_eq!(dot.map("image/a"), Mapped::Invalid(KeyError::DotSegment));
    }

    #[test]
    fn dots_inside_names_are_fine() {
        assert_eq!(
            swap().map("image/..hidden/a..b.png"),
            Mapped::To("avatar/..hidden/a..b.png".into())
        );
    }

    #[test]
    fn key_length_counts_bytes_including_the_prefix() {
        let r = swap();
        // "é" is two bytes: 7 + 2 * 508 = 1023 fits, 7 + 2 * 509 = 1025 does not.
        let fits = "é".repeat(508);
        assert!(matches!(r.map(&format!("image/{fits}")), Mapped::To(_)));
        let over = "é".repeat(509);
        assert_eq!(
            r.map(&format!("image/{over}")),
            Mapped::Invalid(KeyError::TooLong(1025))
        );
    }

    #[test]
    fn too_long_keys_are_invalid() {
        let r = swap();
        let rest = "a".repeat(MAX_KEY_BYTES - "avatar/".len() + 1);
        assert_eq!(
            r.map(&format!("image/{rest}")),
            Mapped::Invalid(KeyError::TooLong(MAX_KEY_BYTES + 1))
        );
        let fits = "a".repeat(MAX_KEY_BYTES - "avatar/".len());
        assert!(matches!(r.map(&format!("image/{fits}")), Mapped::To(_)));
    }

    #[test]
    fn control_characters_and_leading_slash_are_invalid() {
        let r = swap();
        assert_eq!(
            r.map("image/a\u{0}b"),
            Mapped::Invalid(KeyError::ControlChar(0))
        );
        assert_eq!(
            r.map("image/a\nb"),
            Mapped::Invalid(KeyError::ControlChar(10))
        );
        let whole = Rewrite::new("", "avatar/", None);
        assert_eq!(whole.map("/etc/x"), Mapped::Invalid(KeyError::LeadingSlash));
        assert_eq!(
            swap().map("image//x"),
            Mapped::Invalid(KeyError::LeadingSlash)
        );
    }
}
