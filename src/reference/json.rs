//! The JSON document shape (`--json-key`, Shrine's `image_data`): a `json`, `jsonb` or
//! `text` column holds a document, and the fields `--json-key` names (`id`,
//! `derivatives.thumb.id`) hold keys. A row is on a side when one of them holds a key
//! under that side's prefix; a move rewrites those fields, and sets each
//! `--json-set FIELD=VALUE` next to them, in one compare-and-swap on the whole old
//! document. Nothing else in the document changes: in a `json` or `text` column its
//! text stays byte for byte; a `jsonb` column's text is the database's own form, which the new
//! document keeps too (a field `--json-set` adds goes where `jsonb` orders it).
//!
//! Which rows may use an object: any row holding its key as a string (or a field name)
//! anywhere in its document's text — a field `--json-key` does not name (a derivative
//! the command did not list) keeps it too. The check reads every row of the table:
//! there is no index to find a string inside a document. The key alone does not tell the buckets apart, so the two
//! prefixes may not overlap (as for the key shape).

use std::collections::BTreeMap;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{literal, Moving, NoKey, Shape, Slot};
use crate::config::JsonDocument;
use crate::s3::Side;

/// Run first by every session of a job with `--json-key`: a `text` column may hold a
/// value that is no JSON, which a cast would fail the whole statement on; through this
/// it is NULL (no key, not selected, no reference).
pub const SESSION_SQL: &str = "CREATE OR REPLACE FUNCTION pg_temp.relocator_jsonb(v text)
    RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
    BEGIN RETURN v::jsonb; EXCEPTION WHEN others THEN RETURN NULL; END $f$";

/// How the column holds its documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// `jsonb`: PostgreSQL's own form.
    Jsonb,
    /// `json`: the text as written.
    Json,
    /// `text` (or `varchar`): the text as written, which may be no JSON at all.
    Text,
}

#[derive(Debug)]
pub(super) struct Json {
    /// The path column, quoted.
    path: String,
    form: Form,
    /// `--json-key`: field paths, and each as the report names it (dotted).
    keys: Vec<(Vec<String>, String)>,
    /// `--json-set`.
    set: Vec<(String, String)>,
    /// The key prefixes of `--source` and `--dest`.
    prefixes: (String, String),
}

impl Json {
    pub(super) fn new(
        j: &JsonDocument,
        path: String,
        form: Form,
        (source, dest): (&str, &str),
    ) -> Json {
        Json {
            path,
            form,
            keys: j.keys.iter().map(|k| (k.clone(), k.join("."))).collect(),
            set: j.set.clone(),
            prefixes: (source.to_owned(), dest.to_owned()),
        }
    }

    fn prefix(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.prefixes.0,
            Side::Dest => &self.prefixes.1,
        }
    }

    /// Row `t`'s document, as `jsonb`: NULL for a text that is no JSON, and for a `json`
    /// one `jsonb` cannot hold (a number beyond `numeric`, `\u0000`), which a cast would
    /// fail the whole statement on.
    fn doc(&self, t: &str) -> String {
        match self.form {
            Form::Jsonb => format!("{t}.{}", self.path),
            Form::Json | Form::Text => {
                format!("pg_temp.relocator_jsonb({t}.{}::text)", self.path)
            }
        }
    }

    /// Row `t`'s field `key`, as text (NULL when absent).
    fn field(&self, t: &str, key: &[String]) -> String {
        let path: Vec<String> = key.iter().map(|k| literal(k)).collect();
        format!("({} #>> ARRAY[{}]::text[])", self.doc(t), path.join(", "))
    }

    /// The edits that make `old` hold the moving references (and `--json-set` next to
    /// them): (start, end, replacement), in `old`'s bytes.
    fn edits(
        &self,
        old: &str,
        moving: &[Moving<'_>],
    ) -> Result<Vec<(usize, usize, String)>, String> {
        let mut edits = Vec::new();
        let mut parents = Vec::new();
        for m in moving {
            let Some((key, _)) = self.keys.iter().find(|(_, label)| label == m.at) else {
                continue;
            };
            let (at, _) = locate(old, old, key)?.ok_or("the field is gone")?;
            edits.push((at.0, at.1, quoted(m.new_key)));
            let parent = &key[..key.len() - 1];
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
        for parent in parents {
            let obj = if parent.is_empty() {
                Some(old.trim())
            } else {
                locate(old, old, parent)?.map(|(span, _)| &old[span.0..span.1])
            };
            let Some(obj) = obj else {
                continue;
            };
            let fields = entries(obj)?;
            for (name, value) in &self.set {
                let found: Vec<_> = fields.iter().filter(|(k, _)| k == name).collect();
                match found.as_slice() {
                    [(_, raw)] => {
                        let s = span(old, raw);
                        edits.push((s.0, s.1, quoted(value)));
                    }
                    [] => edits.push(self.insertion(old, obj, &fields, name, value)),
                    _ => return Err(format!("the document has the field {name:?} twice")),
                }
            }
        }
        Ok(edits)
    }

    /// Where and how field `name` is added to object `obj` (a slice of `old`): in a
    /// `json` column at its end; in a `jsonb` column where `jsonb` orders it (shorter
    /// keys first, then by bytes), in its form (`"k": v, `).
    fn insertion(
        &self,
        old: &str,
        obj: &str,
        fields: &[(String, &RawValue)],
        name: &str,
        value: &str,
    ) -> (usize, usize, String) {
        let field = format!("{}: {}", quoted(name), quoted(value));
        let end = offset(old, obj) + obj.len() - 1;
        if self.form == Form::Jsonb {
            let after = fields
                .iter()
                .find(|(k, _)| (k.len(), k.as_str()) > (name.len(), name));
            if let Some((k, raw)) = after {
                // The key's start: its value's, less `"key": `.
                let at = span(old, raw).0 - quoted(k).len() - 2;
                return (at, at, format!("{field}, "));
            }
        }
        if fields.is_empty() {
            (end, end, field)
        } else {
            (end, end, format!(", {field}"))
        }
    }
}

/// `s` as a JSON string.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Where slice `part` of `base` starts in it.
fn offset(base: &str, part: &str) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
}

/// Where a value parsed out of `base` lies in it.
fn span(base: &str, raw: &RawValue) -> (usize, usize) {
    let at = offset(base, raw.get());
    (at, at + raw.get().len())
}

/// The fields of JSON object `obj`, in order, each value as it is written.
fn entries(obj: &str) -> Result<Vec<(String, &RawValue)>, String> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(e) = map.next_entry::<String, &'de RawValue>()? {
                out.push(e);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(obj);
    let found = (&mut de)
        .deserialize_map(Entries)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| format!("the value is not a JSON object: {e}"))?;
    Ok(found)
}

/// A field's value: its span in the document, and the string it is (if it is one).
type Found = ((usize, usize), Option<String>);

/// Field `path` of object `obj` (a slice of `base`): its span in `base`, and whether it
/// is a string (with the string). `None` where the path does not lead to a value.
fn locate(base: &str, obj: &str, path: &[String]) -> Result<Option<Found>, String> {
    let fields = entries(obj)?;
    let found: Vec<_> = fields.iter().filter(|(k, _)| *k == path[0]).collect();
    let raw = match found.as_slice() {
        [] => return Ok(None),
        [(_, raw)] => *raw,
        _ => return Err(format!("the document has the field {:?} twice", path[0])),
    };
    if path.len() > 1 {
        if !raw.get().starts_with('{') {
            return Ok(None);
        }
        return locate(base, raw.get(), &path[1..]);
    }
    let string = serde_json::from_str::<String>(raw.get()).ok();
    Ok(Some((span(base, raw), string)))
}

/// SQL: a regular expression for a field named `name` whose value is a string starting
/// with `value` (itself a regular expression), as a document's text spells it.
fn named_string(name: &str, value: &str) -> String {
    literal(&format!(r#""{}"\s*:\s*"{value}"#, regex::escape(name)))
}

/// `edits` applied to `old`, none overlapping.
fn apply(old: &str, mut edits: Vec<(usize, usize, String)>) -> String {
    edits.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut out = old.to_owned();
    for (start, end, with) in edits {
        out.replace_range(start..end, &with);
    }
    out
}

impl Shape for Json {
    /// A listed field holding a key under `side`'s prefix. In a `json` or `text` column,
    /// a document `jsonb` cannot read (`1e999999`, `\u0000`) is found by its text: a
    /// field of the listed paths' last name holding a string that starts with the prefix
    /// (its `/` written `/` or `\/`). Reading it then is [`Shape::keys_of`]'s.
    fn selects(&self, side: Side, t: &str) -> String {
        let mut any: Vec<String> = self
            .keys
            .iter()
            .map(|(k, _)| {
                format!(
                    "starts_with({}, {})",
                    self.field(t, k),
                    literal(self.prefix(side))
                )
            })
            .collect();
        if self.form != Form::Jsonb {
            let prefix = regex::escape(self.prefix(side)).replace('/', r"(/|\\/)");
            let mut names: Vec<&String> = self.keys.iter().filter_map(|(k, _)| k.last()).collect();
            names.sort();
            names.dedup();
            for name in names {
                any.push(format!(
                    "({t}.{}::text ~ {} AND {} IS NULL)",
                    self.path,
                    named_string(name, &prefix),
                    self.doc(t)
                ));
            }
        }
        format!("({})", any.join(" OR "))
    }

    fn value(&self, t: &str) -> String {
        format!("{t}.{}::text", self.path)
    }

    fn holds(&self, t: &str, v: &str) -> String {
        match self.form {
            Form::Jsonb => format!("{t}.{} = ({v})::jsonb", self.path),
            Form::Json => format!("{t}.{}::text = {v}", self.path),
            Form::Text => format!("{t}.{} = {v}", self.path),
        }
    }

    fn assign(&self, v: &str) -> String {
        match self.form {
            Form::Jsonb => format!("{} = ({v})::jsonb", self.path),
            Form::Json => format!("{} = ({v})::json", self.path),
            Form::Text => format!("{} = {v}", self.path),
        }
    }

    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        let mut slots = Vec::new();
        let mut parents = BTreeMap::new();
        for (key, label) in &self.keys {
            let Some((_, Some(s))) = locate(value, value, key).map_err(NoKey::Invalid)? else {
                continue;
            };
            if s.starts_with(&self.prefixes.0) {
                slots.push(Slot {
                    at: label.clone(),
                    key: s,
                });
                parents.insert(&key[..key.len() - 1], ());
            }
        }
        if slots.is_empty() {
            return Err(NoKey::Invalid(
                "no --json-key field holds a key under --source's prefix".into(),
            ));
        }
        // What --json-set will change must be there once, or not at all.
        let moving: Vec<Moving<'_>> = slots
            .iter()
            .map(|s| Moving {
                at: &s.at,
                new_key: "",
            })
            .collect();
        self.edits(value, &moving).map_err(NoKey::Invalid)?;
        Ok(slots)
    }

    fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String {
        match self.edits(old, moving) {
            Ok(edits) => apply(old, edits),
            // keys_of read this value: it has no such error.
            Err(_) => old.to_owned(),
        }
    }

    /// Each listed field's key on `side`; in a document `jsonb` cannot read, the first
    /// string of a field with the path's last name, decoded (as [`Shape::selects`] finds
    /// such a document).
    fn key_bytes(&self, side: Side, t: &str) -> Vec<String> {
        let prefix = literal(self.prefix(side));
        let mut names = std::collections::HashSet::new();
        self.keys
            .iter()
            .map(|(k, _)| {
                let f = self.field(t, k);
                let fast = format!("WHEN starts_with({f}, {prefix}) THEN convert_to({f}, 'UTF8')");
                // One key per name: two paths ending in `id` find the same string.
                let loose = self.form != Form::Jsonb;
                let Some(name) = k.last().filter(|n| loose && names.insert(n.as_str())) else {
                    return format!("CASE {fast} END");
                };
                let literal_of = named_string(name, r#"((?:[^"\\]|\\.)*)""#);
                let loose = format!(
                    "(pg_temp.relocator_jsonb('\"' || substring({t}.{}::text from {literal_of}) || '\"') #>> '{{}}')",
                    self.path
                );
                format!(
                    "CASE {fast}
                          WHEN {} IS NULL AND starts_with({loose}, {prefix})
                          THEN convert_to({loose}, 'UTF8') END",
                    self.doc(t)
                )
            })
            .collect()
    }

    fn scanned_columns(&self) -> Vec<String> {
        vec![self.path.clone()]
    }

    /// Any string of any document, and any field name, read from the document's text
    /// (a `jsonb` column's as PostgreSQL prints it; a `json` or `text` column's as
    /// written, not through `jsonb`, which keeps only the last of two fields of one name
    /// and cannot read some documents at all, `1e999999`): every string literal, decoded
    /// (`image\/a` and `caf\u00e9` are the keys they spell), or as written where it does
    /// not decode. A string that is itself a JSON text (a document stored as a string in
    /// another) counts with the strings in it. In a value that is no JSON, the key
    /// anywhere in its text counts too (its `/` written `/` or `\/`), and so does an
    /// unclosed last string literal.
    fn referenced(&self, tbl: &str) -> String {
        let p = &self.path;
        // The strings of a string that is a JSON text, for `x.c`.
        let inner = "SELECT e FROM unnest(string_to_array(x.c, '\"')) AS e
                      WHERE left(x.c, 1) IN ('{', '[')";
        let keys = "SELECT k FROM unnest($1::text[]) AS k";
        // Outside its strings a JSON text has no `"`. Without a backslash (no escapes,
        // nearly every document) the text between two quotes is a string as it is: the
        // text split at quotes gives every string (and the bits between, which only keep
        // more). With one, a regular expression finds each literal, escapes included, and
        // the database decodes it. In a text cut short (a `varchar` that truncated it),
        // the last string may have lost its closing quote (and end in half an escape):
        // both ways read it too.
        let literals = literal(r#""((?:[^"\\]|\\.)*)(?:"|\\?$)"#);
        let strings = format!(
            "SELECT DISTINCT x.c FROM (
                 SELECT s AS c FROM {tbl} AS t, unnest(string_to_array(t.{p}::text, '\"')) AS s
                  WHERE strpos(t.{p}::text, chr(92)) = 0
             ) AS x WHERE x.c IN ({keys})
             UNION
             SELECT y.c FROM (
                 SELECT CASE WHEN strpos(l.s, chr(92)) = 0 THEN l.s
                             ELSE coalesce(pg_temp.relocator_jsonb('\"' || l.s || '\"') #>> '{{}}',
                                           l.s) END AS c
                   FROM (SELECT (regexp_matches(t.{p}::text, {literals}, 'g'))[1] AS s
                           FROM {tbl} AS t WHERE strpos(t.{p}::text, chr(92)) > 0) AS l
             ) AS x, LATERAL (SELECT x.c UNION ALL {inner}) AS y(c)
             WHERE y.c IN ({keys})"
        );
        if self.form != Form::Text {
            // The json and jsonb types hold only JSON: the strings are all there is.
            return strings;
        }
        format!(
            "{strings} UNION
             SELECT u.k::text FROM unnest($1::text[]) AS u(k)
               JOIN (SELECT t.{p}::text AS v FROM {tbl} AS t
                      WHERE t.{p} IS NOT NULL AND {} IS NULL) AS bad
                 ON strpos(bad.v, u.k) > 0 OR strpos(replace(bad.v, chr(92) || '/', '/'), u.k) > 0",
            self.doc("t"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(jsonb: bool) -> Json {
        let form = if jsonb { Form::Jsonb } else { Form::Json };
        Json::new(
            &JsonDocument {
                keys: vec![
                    vec!["id".into()],
                    vec!["derivatives".into(), "thumb".into(), "id".into()],
                ],
                set: vec![("storage".into(), "store".into())],
            },
            "\"image_data\"".into(),
            form,
            ("image/", "avatar/"),
        )
    }

    fn moving<'a>(slots: &'a [Slot], to: &'a [String]) -> Vec<Moving<'a>> {
        slots
            .iter()
            .zip(to)
            .map(|(s, k)| Moving {
                at: &s.at,
                new_key: k,
            })
            .collect()
    }

    #[test]
    fn only_the_keys_and_the_set_fields_change_byte_for_byte() {
        let j = json(false);
        let old = r#"{ "id" : "image/a.png",  "storage":"cache", "metadata": {"size": 1.50e2},
  "derivatives": {"thumb": {"id": "image/a_\u0074humb.png"}}}"#;
        let slots = j.keys_of(old).unwrap();
        assert_eq!(
            slots,
            [
                Slot {
                    at: "id".into(),
                    key: "image/a.png".into()
                },
                Slot {
                    at: "derivatives.thumb.id".into(),
                    key: "image/a_thumb.png".into()
                }
            ]
        );
        let to = ["avatar/a.png".to_owned(), "avatar/a_thumb.png".to_owned()];
        assert_eq!(
            j.value_for(old, &moving(&slots, &to)),
            r#"{ "id" : "avatar/a.png",  "storage":"store", "metadata": {"size": 1.50e2},
  "derivatives": {"thumb": {"id": "avatar/a_thumb.png", "storage": "store"}}}"#
        );
    }

    #[test]
    fn a_jsonb_document_keeps_its_form() {
        let j = json(true);
        // As PostgreSQL prints a jsonb: keys by length, then bytes.
        let old = r#"{"id": "image/a.png", "metadata": {"size": 150}, "derivatives": {"thumb": {"id": "image/t.png", "metadata": {}}}}"#;
        let slots = j.keys_of(old).unwrap();
        let to = ["avatar/a.png".to_owned(), "avatar/t.png".to_owned()];
        assert_eq!(
            j.value_for(old, &moving(&slots, &to)),
            r#"{"id": "avatar/a.png", "storage": "store", "metadata": {"size": 150}, "derivatives": {"thumb": {"id": "avatar/t.png", "storage": "store", "metadata": {}}}}"#
        );
        let old = r#"{"id": "image/a.png", "zz": 1}"#;
        let slots = j.keys_of(old).unwrap();
        assert_eq!(
            j.value_for(old, &moving(&slots, &to)),
            r#"{"id": "avatar/a.png", "zz": 1, "storage": "store"}"#
        );
    }

    #[test]
    fn documents_that_hold_no_usable_key_are_refused_with_why() {
        let j = json(true);
        assert!(j.keys_of("not json").is_err());
        assert!(j.keys_of(r#"{"id": "image/a", "id": "image/b"}"#).is_err());
        assert!(j.keys_of(r#"{"id": "other/a"}"#).is_err());
        assert!(j
            .keys_of(r#"{"id": "image/a", "storage": 1, "storage": 2}"#)
            .is_err());
        // A derivative elsewhere, or not a string: only `id` moves.
        let slots = j
            .keys_of(r#"{"id": "image/a", "derivatives": {"thumb": {"id": 5}}}"#)
            .unwrap();
        assert_eq!(slots.len(), 1);
    }
}
