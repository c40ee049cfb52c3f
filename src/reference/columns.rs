//! Several reference columns per row (`--path-column` repeated, e.g.
//! `users(avatar_path, banner_path)`): each column holds a key, as in the key shape. A
//! row's value is all of them at once, as PostgreSQL's `json_build_array` prints them
//! (`["image/a.png", null]`), so that one compare-and-swap guards every column and one
//! rewrite sets them together. A row is on a side when one of its columns holds a key
//! under that side's prefix; a column under another prefix (or NULL) is left as it is.
//!
//! Which rows may use an object: any row holding its key in any of the columns (each
//! checked through its own index, where it has one). The key alone tells the sides
//! apart, so the prefixes may not overlap.

use super::{under, Moving, NoKey, Shape, Slot};
use crate::config::quote_ident;
use crate::s3::Side;

#[derive(Debug)]
pub(super) struct Columns {
    /// The columns, as named and quoted.
    columns: Vec<(String, String)>,
    /// The key prefixes of `--source` and `--dest`.
    prefixes: (String, String),
}

impl Columns {
    pub(super) fn new(columns: &[String], (source, dest): (&str, &str)) -> Columns {
        Columns {
            columns: columns
                .iter()
                .map(|c| (c.clone(), quote_ident(c)))
                .collect(),
            prefixes: (source.to_owned(), dest.to_owned()),
        }
    }

    fn prefix(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.prefixes.0,
            Side::Dest => &self.prefixes.1,
        }
    }

    fn array(&self, t: &str) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|(_, q)| format!("{t}.{q}"))
            .collect();
        format!("json_build_array({})", cols.join(", "))
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
            .map(|(_, q)| under(t, q, self.prefix(side)))
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
            .map(|(i, (_, q))| format!("{q} = (({v})::json ->> {i})"))
            .collect();
        set.join(", ")
    }

    fn keys_of(&self, value: &str) -> Result<Vec<Slot>, NoKey> {
        let values = Columns::parse(value).map_err(NoKey::Invalid)?;
        let slots: Vec<Slot> = self
            .columns
            .iter()
            .zip(values)
            .filter_map(|((name, _), v)| {
                let key = v.filter(|k| k.starts_with(&self.prefixes.0))?;
                Some(Slot {
                    at: name.clone(),
                    key,
                })
            })
            .collect();
        if slots.is_empty() {
            return Err(NoKey::Invalid(
                "no --path-column holds a key under --source's prefix".into(),
            ));
        }
        Ok(slots)
    }

    fn value_for(&self, old: &str, moving: &[Moving<'_>]) -> String {
        let Ok(mut values) = Columns::parse(old) else {
            return old.to_owned();
        };
        for m in moving {
            if let Some(i) = self.columns.iter().position(|(name, _)| name == m.at) {
                values[i] = Some(m.new_key.to_owned());
            }
        }
        print(&values)
    }

    fn key_bytes(&self, side: Side, t: &str) -> Vec<String> {
        self.columns
            .iter()
            .map(|(_, q)| {
                format!(
                    "CASE WHEN {} THEN convert_to({t}.{q}, 'UTF8') END",
                    under(t, q, self.prefix(side))
                )
            })
            .collect()
    }

    fn referenced(&self, tbl: &str) -> String {
        let each: Vec<String> = self
            .columns
            .iter()
            .map(|(_, q)| {
                format!("SELECT t.{q}::text FROM {tbl} AS t WHERE t.{q} = ANY ($1::text[])")
            })
            .collect();
        each.join(" UNION ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_moves_the_columns_under_the_source_and_keeps_the_others() {
        let c = Columns::new(
            &["avatar_path".into(), "banner_path".into(), "logo".into()],
            ("image/", "avatar/"),
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
