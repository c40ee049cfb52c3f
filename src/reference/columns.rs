//! Several reference columns per row (`--path-column` repeated, e.g.
//! `users(avatar_path, banner_path)`): each column is a reference of its own shape — a
//! key (the [`key`](super::key) shape) or, named by `--url-column`, a URL (the
//! [`url`](super::url) shape). A row's value is all of them at once, as PostgreSQL's
//! `json_build_array` prints them (`["image/a.png", null]`), so that one
//! compare-and-swap guards every column and one rewrite sets them together. A row is on a
//! side when one of its columns is; a column on neither (another prefix, NULL) is left as
//! it is.
//!
//! Which rows may use an object: any row whose column may, by that column's shape's own
//! check (a key column through its own index, where it has one). A key column alone
//! cannot tell the sides apart, so the prefixes may not overlap.

use super::{Moving, NoKey, Shape, Slot};
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Column {
    /// As named.
    pub(super) name: String,
    /// What the column holds, on the column alone.
    pub(super) shape: Box<dyn Shape>,
}

#[derive(Debug)]
pub(super) struct Columns {
    /// In one order, however they were given: the ledger keeps values in it.
    columns: Vec<Column>,
}

impl Columns {
    pub(super) fn new(columns: Vec<Column>) -> Columns {
        Columns { columns }
    }

    fn array(&self, t: &str) -> String {
        let each: Vec<String> = self.columns.iter().map(|c| c.shape.value(t)).collect();
        format!("json_build_array({})", each.join(", "))
    }

    /// The row's value parsed: one entry per column.
    fn parse(value: &str) -> Result<Vec<Option<String>>, String> {
        serde_json::from_str(value).map_err(|e| format!("unreadable columns {value:?}: {e}"))
    }
}

/// The columns' values as `json_build_array(...)::text` prints them.
fn print(values: &[Option<String>]) -> String {
    let each: Vec<String> = values
        .iter()
        .map(|v| match v {
            Some(s) => serde_json::to_string(s).expect("a string serialises"),
            None => "null".to_owned(),
        })
        .collect();
    format!("[{}]", each.join(", "))
}

impl Shape for Columns {
    fn selects(&self, side: Side, t: &str) -> String {
        let any: Vec<String> = self
            .columns
            .iter()
            .map(|c| c.shape.selects(side, t))
            .collect();
        format!("({})", any.join(" OR "))
    }

    fn value(&self, t: &str) -> String {
        format!("{}::text", self.array(t))
    }

    fn holds(&self, t: &str, v: &str) -> String {
        format!("{}::jsonb = ({v})::jsonb", self.array(t))
    }

    fn assign(&self, v: &str) -> String {
        let set: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| c.shape.assign(&format!("(({v})::json ->> {i})")))
            .collect();
        set.join(", ")
    }

    /// Each column's references, labelled with the column. A column that cannot be read
    /// holds the whole row back (`invalid_key`); one on neither side is left as it is.
    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        let values = Columns::parse(value).map_err(NoKey::Invalid)?;
        let mut slots = Vec::new();
        let mut unmatched = None;
        for (c, v) in self.columns.iter().zip(values) {
            let Some(v) = v else { continue };
            match c.shape.keys_of(&v) {
                Ok(found) => slots.extend(found.into_iter().map(|s| Slot {
                    at: c.name.clone(),
                    key: s.key,
                })),
                Err(NoKey::Invalid(why)) => {
                    return Err(NoKey::Invalid(format!("{}: {why}", c.name)))
                }
                Err(NoKey::Unmatched(why)) => {
                    unmatched.get_or_insert(format!("{}: {why}", c.name));
                }
            }
        }
        if slots.is_empty() {
            return Err(match unmatched {
                Some(why) => NoKey::Unmatched(why),
                None => {
                    NoKey::Invalid("no --path-column holds a key under --source's prefix".into())
                }
            });
        }
        Ok(slots)
    }

    fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String {
        let Ok(mut values) = Columns::parse(old) else {
            return old.to_owned();
        };
        for m in moving {
            let Some(i) = self.columns.iter().position(|c| c.name == m.at) else {
                continue;
            };
            let one = [Moving {
                at: "",
                new_key: m.new_key,
            }];
            let was = values[i].clone().unwrap_or_default();
            values[i] = Some(self.columns[i].shape.value_for(&was, &one));
        }
        print(&values)
    }

    fn key_bytes(&self, side: Side, t: &str) -> Vec<String> {
        self.columns
            .iter()
            .flat_map(|c| {
                let on = c.shape.selects(side, t);
                c.shape
                    .key_bytes(side, t)
                    .into_iter()
                    .map(move |k| format!("CASE WHEN {on} THEN {k} END"))
            })
            .collect()
    }

    fn referenced(&self, tbl: &str) -> String {
        let each: Vec<String> = self
            .columns
            .iter()
            .map(|c| c.shape.referenced(tbl))
            .collect();
        each.join(" UNION ")
    }

    fn takes_param(&self) -> bool {
        self.columns.iter().any(|c| c.shape.takes_param())
    }

    fn param(&self, bucket: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|c| c.shape.takes_param())
            .and_then(|c| c.shape.param(bucket))
    }

    fn scanned_columns(&self) -> Vec<String> {
        self.columns
            .iter()
            .flat_map(|c| c.shape.scanned_columns())
            .collect()
    }

    fn parts(&self, value: &str) -> Option<Vec<(String, Option<String>)>> {
        let values = Columns::parse(value).ok()?;
        Some(
            self.columns
                .iter()
                .map(|c| c.name.clone())
                .zip(values)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_moves_the_columns_under_the_source_and_keeps_the_others() {
        let c = Columns::new(
            ["avatar_path", "banner_path", "logo"]
                .into_iter()
                .map(|name| Column {
                    name: name.into(),
                    shape: Box::new(super::super::key::Key::new(
                        crate::config::quote_ident(name),
                        ("image/", "avatar/"),
                    )),
                })
                .collect(),
        );
        let old = r#"["image/a.png", "image/b \"q\".png", null]"#;
        let slots = c.keys_of(old).unwrap();
        assert_eq!(
            slots.iter().map(|s| s.at.as_str()).collect::<Vec<_>>(),
            ["avatar_path", "banner_path"]
        );
        assert_eq!(slots[1].key, "image/b \"q\".png");
        let moving = [
            Moving {
                at: "avatar_path",
                new_key: "avatar/a.png",
            },
            Moving {
                at: "banner_path",
                new_key: "avatar/b \"q\".png",
            },
        ];
        assert_eq!(
            c.value_for(old, &moving),
            r#"["avatar/a.png", "avatar/b \"q\".png", null]"#
        );
        assert!(c.keys_of(r#"["other/a", null, null]"#).is_err());
        assert_eq!(
            c.assign("u.v"),
            "\"avatar_path\" = ((u.v)::json ->> 0), \"banner_path\" = ((u.v)::json ->> 1), \
             \"logo\" = ((u.v)::json ->> 2)"
        );
    }
}
