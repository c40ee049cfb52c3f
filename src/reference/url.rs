//! The URL shape (`--source-url`, `--dest-url`): the path column holds a URL, e.g.
//! `https://cdn.example.com/image/a%20b.png?v=3`. A row is on the source side when its
//! value starts with one of the `--source-url` prefixes (the same location is often
//! spelled several ways), which stand for `--source`; the key is `--source`'s prefix
//! followed by the rest of the URL's path, percent-decoded (RFC 3986). A move writes
//! `--dest-url`, the new key's rest encoded the way the old one was, and the query
//! string or fragment the old value had.
//!
//! Which rows may use an object: any row whose value's path (a URL's, with or without a
//! scheme, or the value itself), from any of its '/' on and decoded, is the key — as the
//! bucket serves it, virtual-hosted or path-style — or is the key's rest after a side's
//! prefix (a CDN serving the prefix at any path, under any spelling); and a value that
//! is the key itself. Only values that name the other side's bucket (when the sides are
//! two buckets: under its URL prefixes, or with that bucket as the host or first path
//! segment) are known not to use it. Some other rows are counted too (a file of the same
//! name elsewhere): an object is kept rather than lost. The check reads every row of the
//! table: there is no index to find a decoded key.

use percent_encoding::percent_decode_str;

use super::{key, literal, under, whole, Moving, NoKey, Shape, Slot};
use crate::config::UrlColumn;
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Url {
    /// The path column, quoted.
    path: String,
    /// `--source-url` prefixes and `--dest-url`.
    source: Vec<String>,
    dest: String,
    /// The key prefixes of `--source` and `--dest`.
    prefixes: (String, String),
    /// Both sides are one bucket.
    same_bucket: bool,
    /// The buckets of `--source` and `--dest`.
    buckets: (String, String),
}

impl Url {
    pub(super) fn new(
        u: &UrlColumn,
        path: String,
        (source_prefix, dest_prefix): (&str, &str),
        buckets: (&str, &str),
    ) -> Url {
        Url {
            path,
            source: u.source.clone(),
            dest: u.dest.clone(),
            prefixes: (source_prefix.to_owned(), dest_prefix.to_owned()),
            same_bucket: buckets.0 == buckets.1,
            buckets: (buckets.0.to_owned(), buckets.1.to_owned()),
        }
    }

    /// The key URL `value` holds (under a `--source-url`), or why none.
    fn key(&self, value: &str) -> Result<String, String> {
        let Some(u) = self.source.iter().find(|u| value.starts_with(u.as_str())) else {
            return Err("the value is under no --source-url".into());
        };
        let (path, _) = split(&value[u.len()..]);
        Ok(format!("{}{}", self.prefixes.0, decode(path)?))
    }

    /// `side`'s URL prefixes.
    fn urls(&self, side: Side) -> Vec<&str> {
        match side {
            Side::Source => self.source.iter().map(String::as_str).collect(),
            Side::Dest => vec![self.dest.as_str()],
        }
    }

    fn prefix(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.prefixes.0,
            Side::Dest => &self.prefixes.1,
        }
    }

    /// `side`'s key of value `v` (an SQL expression), as `bytea`: NULL when `v` is under
    /// none of `side`'s URL prefixes.
    fn key_sql(&self, side: Side, v: &str) -> String {
        let arms: String = self
            .urls(side)
            .into_iter()
            .map(|u| {
                let rest = format!("substr({v}, {})", u.chars().count() + 1);
                let path = format!("substring({rest} from '^[^?#]*')");
                // A malformed escape holds no key (`run` reports it `invalid_key`).
                format!(
                    " WHEN starts_with({v}, {}) AND {path} !~ '%(?![0-9A-Fa-f]{{2}})' THEN \
                     convert_to({}, 'UTF8') || {}",
                    literal(u),
                    literal(self.prefix(side)),
                    decoded(&path)
                )
            })
            .collect();
        format!("CASE{arms} END")
    }
}

/// A URL's start up to its host: a scheme (or none: `//host`, protocol-relative) and `//`.
const AUTHORITY: &str = "^(?:[A-Za-z][A-Za-z0-9+.-]*:)?//";

/// SQL: the text `x` percent-decoded, as `bytea` (a `%` not followed by two hex digits
/// stays as it is). No function: `plan` and `verify` create nothing in the database.
fn decoded(x: &str) -> String {
    format!(
        "CASE WHEN strpos({x}, '%') = 0 THEN convert_to({x}, 'UTF8') ELSE
           (SELECT string_agg(CASE WHEN m[1] IS NULL THEN convert_to(m[2], 'UTF8')
                                   ELSE decode(substr(m[1], 2), 'hex') END, ''::bytea ORDER BY o)
              FROM regexp_matches({x}, '(%[0-9A-Fa-f]{{2}})|([^%]+|%)', 'g')
                   WITH ORDINALITY AS r(m, o)) END"
    )
}

/// The path of URL `rest` (after the prefix) and what follows it: `?query`, `#fragment`.
fn split(rest: &str) -> (&str, &str) {
    rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()))
}

/// A URL path, percent-decoded; an error for a `%` not followed by two hex digits, or
/// bytes that are not UTF-8.
fn decode(path: &str) -> Result<String, String> {
    let b = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        if !(b.len() > i + 2 && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
            return Err(format!(
                "the URL's path has a '%' at byte {i} not followed by two hex digits \
                 (RFC 3986 percent-encoding)"
            ));
        }
    }
    percent_decode_str(path)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "the URL's path decodes to bytes that are not UTF-8".to_owned())
}

/// Characters a URL path carries as they are when the old value gives no example:
/// RFC 3986's unreserved ones and the segment separator.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~/".contains(c)
}

/// `new` encoded the way `old` (an encoded path) is: a character `old` carries as it
/// is stays so, one it encodes is encoded, others by RFC 3986; hex digits in `old`'s
/// case.
fn encode_like(old: &str, new: &str) -> String {
    let mut literal = std::collections::HashSet::new();
    let mut encoded = std::collections::HashSet::new();
    let mut lower = false;
    let mut rest = old;
    while let Some(c) = rest.chars().next() {
        if c == '%' && rest.len() >= 3 {
            // The whole run of escapes is one or more characters.
            let run = rest
                .as_bytes()
                .chunks(3)
                .take_while(|e| e.len() == 3 && e[0] == b'%')
                .count();
            let (esc, after) = rest.split_at(run * 3);
            lower |= esc.chars().any(|c| c.is_ascii_lowercase());
            encoded.extend(percent_decode_str(esc).decode_utf8_lossy().chars());
            rest = after;
        } else {
            literal.insert(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    let mut out = String::with_capacity(new.len());
    for c in new.chars() {
        let keep = c != '%' && (literal.contains(&c) || (!encoded.contains(&c) && plain(c)));
        if keep {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                if lower {
                    out.push_str(&format!("%{b:02x}"));
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

impl Shape for Url {
    /// On the source side every value not under `--dest-url`: those under no
    /// `--source-url` are reported `unmatched` (a spelling the command may have missed).
    fn selects(&self, side: Side, t: &str) -> String {
        if side == Side::Source {
            return format!(
                "({t}.{p} IS NOT NULL AND NOT {})",
                under(t, &self.path, &self.dest),
                p = self.path
            );
        }
        let any: Vec<String> = self
            .urls(side)
            .into_iter()
            .map(|u| under(t, &self.path, u))
            .collect();
        format!("({})", any.join(" OR "))
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
        if !self.source.iter().any(|u| value.starts_with(u.as_str())) {
            return Err(NoKey::Unmatched(
                "the value starts with no --source-url (if it names an object under \
                 --source, give its spelling with another --source-url)"
                    .into(),
            ));
        }
        self.key(value).map(whole).map_err(NoKey::Invalid)
    }

    fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String {
        let old_key = self.key(old).unwrap_or_default();
        let new_key = moving.first().map_or("", |m| m.new_key);
        let u = self
            .source
            .iter()
            .find(|u| old.starts_with(u.as_str()))
            .map_or(0, |u| u.len());
        let (path, after) = split(&old[u..]);
        let old_rest = old_key.strip_prefix(&self.prefixes.0).unwrap_or(&old_key);
        let new_rest = new_key.strip_prefix(&self.prefixes.1).unwrap_or(new_key);
        let encoded = if old_rest == new_rest {
            path.to_owned()
        } else {
            encode_like(path, new_rest)
        };
        format!("{}{encoded}{after}", self.dest)
    }

    fn key_bytes(&self, side: Side, t: &str) -> Vec<String> {
        vec![self.key_sql(side, &format!("{t}.{}", self.path))]
    }

    fn scanned_columns(&self) -> Vec<String> {
        vec![self.path.clone()]
    }

    /// `$2`: the sides whose URL prefixes name the object's bucket (`source`, `dest` or
    /// `both`).
    fn referenced(&self, tbl: &str) -> String {
        let col = format!("t.{}", self.path);
        // Each row's value as stored, and, where it differs, as a browser reads a URL
        // (WHATWG): without leading and trailing spaces and control characters, tabs and
        // line breaks, with `\` as `/`.
        let browser = format!(
            "replace(regexp_replace({col}, {}, '', 'g'), chr(92), '/')",
            literal(r"^[\x01-\x20]+|[\x01-\x20]+$|[\t\n\r]")
        );
        let values = format!(
            "SELECT {col} AS v FROM {tbl} AS t
             UNION ALL
             SELECT z.b FROM (SELECT {browser} AS b, {col} AS c FROM {tbl} AS t) AS z
              WHERE z.b <> z.c"
        );
        let v = "w.v".to_owned();
        // A value names the other side's bucket (when the sides are two buckets) if it
        // is under the other side's URL prefixes, or names that bucket as a URL's host
        // (virtual-hosted, s3://) or first path segment (path-style).
        let other = |side: Side| {
            let bucket = regex::escape(match side {
                Side::Source => &self.buckets.0,
                Side::Dest => &self.buckets.1,
            });
            self.urls(side)
                .into_iter()
                .map(|u| format!(" OR starts_with({v}, {})", literal(u)))
                .chain([
                    format!(
                        " OR {v} ~* {}",
                        literal(&format!("{AUTHORITY}{bucket}([./:]|$)"))
                    ),
                    format!(
                        " OR {v} ~* {}",
                        literal(&format!("{AUTHORITY}[^/?#]*/{bucket}/"))
                    ),
                ])
                .collect::<String>()
        };
        let mine = format!(
            "NOT (($2::text = 'source' AND (false{})) OR ($2::text = 'dest' AND (false{})))",
            other(Side::Dest),
            other(Side::Source)
        );
        // The value's path, query and fragment left out: a URL's (with or without its
        // scheme), else the value's own (a path, a bare key).
        // An `s3://` URI has no query or fragment: its `?` and `#` are the key's, and it is
        // not percent-encoded (its path counts as written, and decoded).
        let is_s3 = format!("({v} ~* '^s3://')");
        let path = format!(
            "CASE WHEN {is_s3} THEN substring({v} from '^[^:]*://[^/]*(/.*)$')
                  ELSE coalesce(substring({v} from {}), substring({v} from '^([^?#]*)')) END",
            literal(&format!("{AUTHORITY}[^/?#]*(/[^?#]*)"))
        );
        // Every part of the path from a '/' on, decoded, as a key: as the bucket serves it
        // (virtual-hosted, path-style after the bucket), or after a side's prefix (a CDN
        // serving the prefix at any path, spelled any way).
        let tail = decoded("q.s");
        // Each of those ends as the path's last segment, decoded, does: only a row whose
        // last segment ends (after its last `/`, an encoded one) as one of the keys does
        // after its last `/` can hold one of them there, and only those rows are taken
        // apart (the others are most of a large table). A row may also hold a key as its
        // whole value.
        let last = decoded(&format!(
            "regexp_replace(substring({path} from '[^/]*$'), '^.*%2[Ff]', '')"
        ));
        let may = format!(
            "(convert_to({v}, 'UTF8') IN (SELECT convert_to(k, 'UTF8') FROM unnest($1::text[]) AS k)
              OR {last} IN (SELECT convert_to(substring(k from '[^/]*$'), 'UTF8')
                              FROM unnest($1::text[]) AS k)
              OR {is_s3})"
        );
        format!(
            "SELECT DISTINCT u.k::text FROM unnest($1::text[]) AS u(k)
               JOIN (SELECT x.c FROM (SELECT w.v FROM ({values}) AS w WHERE {may}) AS w
                       CROSS JOIN LATERAL (SELECT string_to_array({path}, '/') AS a) AS p
                       CROSS JOIN LATERAL generate_series(1, greatest(cardinality(p.a), 1)) AS i
                       CROSS JOIN LATERAL (SELECT array_to_string(p.a[i:], '/') AS s) AS q
                       CROSS JOIN LATERAL (VALUES
                           ({tail}),
                           (CASE WHEN $2::text <> 'dest' THEN convert_to({}, 'UTF8') || {tail} END),
                           (CASE WHEN $2::text <> 'source' THEN convert_to({}, 'UTF8') || {tail} END),
                           (CASE WHEN i = 1 THEN convert_to({v}, 'UTF8') END),
                           (CASE WHEN {is_s3} THEN convert_to(q.s, 'UTF8') END)) AS x(c)
                      WHERE {mine}
                     ) AS s ON s.c = convert_to(u.k, 'UTF8')",
            literal(&self.prefixes.0),
            literal(&self.prefixes.1),
        )
    }

    fn takes_param(&self) -> bool {
        true
    }

    fn param(&self, bucket: &str) -> Option<&str> {
        if self.same_bucket {
            Some("both")
        } else if bucket == self.buckets.0 {
            Some("source")
        } else if bucket == self.buckets.1 {
            Some("dest")
        } else {
            Some("both")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::new(
            &UrlColumn {
                source: vec![
                    "https://legacy-s3.s3.eu-west-1.amazonaws.com/image/".into(),
                    "https://cdn.example.com/".into(),
                ],
                dest: "https://new.example.com/a/".into(),
                columns: Vec::new(),
            },
            "\"avatar_url\"".into(),
            ("image/", "avatar/"),
            ("legacy-s3", "production-s3"),
        )
    }

    #[test]
    fn the_key_is_the_decoded_path_after_the_prefix() {
        let u = url();
        assert_eq!(
            u.key("https://legacy-s3.s3.eu-west-1.amazonaws.com/image/a%20b.png")
                .unwrap(),
            "image/a b.png"
        );
        assert_eq!(
            u.key("https://cdn.example.com/x/%C3%A9.png?v=3#top")
                .unwrap(),
            "image/x/é.png"
        );
        assert!(u.key("https://cdn.example.com/100%.png").is_err());
        assert!(u.key("https://cdn.example.com/%ff.png").is_err());
        assert!(u.key("http://cdn.example.com/a.png").is_err());
    }

    #[test]
    fn the_new_value_keeps_the_encoding_and_the_query() {
        let u = url();
        let old = "https://cdn.example.com/a%20b+c.png?v=3";
        assert_eq!(u.key(old).unwrap(), "image/a b+c.png");
        assert_eq!(
            u.value_for(
                old,
                &[Moving {
                    at: "",
                    new_key: "avatar/a b+c.png"
                }]
            ),
            "https://new.example.com/a/a%20b+c.png?v=3"
        );
        // A rewritten rest: spaces encoded as the old one did, '+' kept as it was, a
        // character with no example by RFC 3986.
        assert_eq!(
            u.value_for(
                old,
                &[Moving {
                    at: "",
                    new_key: "avatar/b c+d[1].png"
                }]
            ),
            "https://new.example.com/a/b%20c+d%5B1%5D.png?v=3"
        );
        // Lower-case hex, and a character the old one carried as it is.
        let old = "https://cdn.example.com/%c3%a9 x.png#f";
        assert_eq!(u.key(old).unwrap(), "image/é x.png");
        assert_eq!(
            u.value_for(
                old,
                &[Moving {
                    at: "",
                    new_key: "avatar/é y ü.png"
                }]
            ),
            "https://new.example.com/a/%c3%a9 y %c3%bc.png#f"
        );
        // An unchanged rest keeps its exact spelling, even an unusual one.
        let old = "https://cdn.example.com/%61b.png";
        assert_eq!(u.key(old).unwrap(), "image/ab.png");
        assert_eq!(
            u.value_for(
                old,
                &[Moving {
                    at: "",
                    new_key: "avatar/ab.png"
                }]
            ),
            "https://new.example.com/a/%61b.png"
        );
    }

    #[test]
    fn every_value_not_yet_moved_is_selected_and_one_under_no_prefix_is_unmatched() {
        let u = url();
        assert_eq!(
            u.selects(Side::Source, "t"),
            "(t.\"avatar_url\" IS NOT NULL AND NOT starts_with(t.\"avatar_url\", \
             E'https://new.example.com/a/'))"
        );
        assert_eq!(
            u.selects(Side::Dest, "t"),
            "(starts_with(t.\"avatar_url\", E'https://new.example.com/a/'))"
        );
        assert!(matches!(
            u.keys_of("http://cdn.example.com/a.png"),
            Err(NoKey::Unmatched(_))
        ));
        assert!(matches!(
            u.keys_of("https://cdn.example.com/%zz.png"),
            Err(NoKey::Invalid(_))
        ));
        assert_eq!(u.param("legacy-s3"), Some("source"));
        assert_eq!(u.param("production-s3"), Some("dest"));
    }
}
