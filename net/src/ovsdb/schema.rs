//! Database schemas (RFC 7047 §3.2), as far as a client needs them: column types, to tell a set of one from an
//! atom, to fill in the defaults `update2` leaves out, and to apply `update2` diffs.

use std::collections::BTreeMap;

use serde_json::Value as Json;
use uuid::Uuid;

use super::data::{Atom, Row, Value};

/// A database schema, as `get_schema` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    /// The database name, e.g. `Open_vSwitch`.
    pub name: String,
    /// The schema version, e.g. `8.3.0`.
    pub version: String,
    /// Tables by name.
    pub tables: BTreeMap<String, TableSchema>,
}

/// One table of a [`Schema`].
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    /// Columns by name, without the implicit `_uuid` and `_version`.
    pub columns: BTreeMap<String, ColumnType>,
    /// Whether rows survive without references (non-root rows are garbage collected when unreferenced).
    pub is_root: bool,
    /// Sets of columns whose values must be unique together.
    pub indexes: Vec<Vec<String>>,
}

/// The atomic types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicType {
    /// `integer`
    Integer,
    /// `real`
    Real,
    /// `boolean`
    Boolean,
    /// `string`
    String,
    /// `uuid`
    Uuid,
}

/// A column's type: a key type, an optional value type (maps), and how many elements it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnType {
    /// Type of the elements (of the keys, for a map).
    pub key: AtomicType,
    /// Type of the values, for a map.
    pub value: Option<AtomicType>,
    /// Fewest elements.
    pub min: u64,
    /// Most elements; `None` is unlimited.
    pub max: Option<u64>,
}

impl ColumnType {
    /// The type of `_uuid`.
    pub const UUID: ColumnType = ColumnType { key: AtomicType::Uuid, value: None, min: 1, max: Some(1) };

    /// Exactly one atom.
    pub fn is_scalar(&self) -> bool {
        self.value.is_none() && self.min == 1 && self.max == Some(1)
    }

    /// A map.
    pub fn is_map(&self) -> bool {
        self.value.is_some()
    }

    /// A set (including an optional value: a set of at most one).
    pub fn is_set(&self) -> bool {
        !self.is_scalar() && !self.is_map()
    }

    /// The value of a fresh row: zero, empty string, false, the all-zero uuid, or an empty set or map.
    pub fn default_value(&self) -> Value {
        if self.is_map() {
            return Value::empty_map();
        }
        if self.is_set() {
            return Value::empty_set();
        }
        Value::Atom(match self.key {
            AtomicType::Integer => Atom::Integer(0),
            AtomicType::Real => Atom::Real(0.0),
            AtomicType::Boolean => Atom::Boolean(false),
            AtomicType::String => Atom::String(String::new()),
            AtomicType::Uuid => Atom::Uuid(Uuid::nil()),
        })
    }

    /// Puts `value` in its canonical shape for this type: a scalar is an atom, a set is always a set, a map a map.
    pub fn normalize(&self, value: Value) -> Value {
        match value {
            Value::Set(mut atoms) if self.is_scalar() && atoms.len() == 1 => Value::Atom(atoms.remove(0)),
            Value::Atom(atom) if self.is_set() => Value::Set(vec![atom]),
            Value::Set(atoms) if self.is_map() && atoms.is_empty() => Value::empty_map(),
            value => value,
        }
    }

    /// Applies an `update2` `modify` difference (ovsdb-server(7) §4.1.14) to `current`:
    /// a column of at most one element takes the difference as its new value unless it was empty; other sets take
    /// the symmetric difference; maps drop pairs the difference repeats and take the others.
    pub fn apply_diff(&self, current: &mut Value, diff: Value) {
        let diff = self.normalize(diff);
        if self.is_scalar() {
            *current = diff;
            return;
        }
        let current_empty = match current {
            Value::Set(atoms) => atoms.is_empty(),
            Value::Map(pairs) => pairs.is_empty(),
            Value::Atom(_) => false,
        };
        if self.max == Some(1) && !current_empty {
            *current = diff;
            return;
        }
        match (&mut *current, diff) {
            (Value::Map(pairs), Value::Map(diff)) => {
                for (key, value) in diff {
                    match pairs.iter().position(|(k, _)| *k == key) {
                        Some(i) if pairs[i].1 == value => {
                            pairs.remove(i);
                        }
                        Some(i) => pairs[i].1 = value,
                        None => pairs.push((key, value)),
                    }
                }
            }
            (Value::Set(atoms), Value::Set(diff)) => {
                for atom in diff {
                    match atoms.iter().position(|a| *a == atom) {
                        Some(i) => {
                            atoms.remove(i);
                        }
                        None => atoms.push(atom),
                    }
                }
            }
            (current, diff) => *current = diff,
        }
    }
}

impl Schema {
    /// Parses the JSON `get_schema` returns.
    pub fn from_json(json: &Json) -> Result<Self, String> {
        let name = json.get("name").and_then(Json::as_str).ok_or("no \"name\"")?.to_owned();
        let version = json.get("version").and_then(Json::as_str).unwrap_or_default().to_owned();
        let tables_json = json.get("tables").and_then(Json::as_object).ok_or("no \"tables\" object")?;
        let mut tables = BTreeMap::new();
        for (table_name, table) in tables_json {
            let columns_json = table
                .get("columns")
                .and_then(Json::as_object)
                .ok_or_else(|| format!("table {table_name} has no \"columns\" object"))?;
            let mut columns = BTreeMap::new();
            for (column_name, column) in columns_json {
                let ty =
                    column.get("type").ok_or_else(|| format!("column {table_name}.{column_name} has no \"type\""))?;
                let ty = parse_type(ty).map_err(|e| format!("column {table_name}.{column_name}: {e}"))?;
                columns.insert(column_name.clone(), ty);
            }
            let indexes = table
                .get("indexes")
                .and_then(Json::as_array)
                .map(|indexes| {
                    indexes
                        .iter()
                        .filter_map(Json::as_array)
                        .map(|cols| cols.iter().filter_map(Json::as_str).map(str::to_owned).collect())
                        .collect()
                })
                .unwrap_or_default();
            tables.insert(
                table_name.clone(),
                TableSchema { columns, is_root: table.get("isRoot").and_then(Json::as_bool).unwrap_or(false), indexes },
            );
        }
        Ok(Schema { name, version, tables })
    }

    /// The type of `table`.`column`, including the implicit `_uuid` and `_version`.
    pub fn column_type(&self, table: &str, column: &str) -> Option<ColumnType> {
        if column == "_uuid" || column == "_version" {
            return self.tables.contains_key(table).then_some(ColumnType::UUID);
        }
        self.tables.get(table)?.columns.get(column).copied()
    }

    /// Normalizes every known column of `row` and, when `fill` names the monitored columns, adds the defaults the
    /// server left out.
    pub(crate) fn complete_row(&self, table: &str, row: &mut Row, fill: Option<&[String]>) {
        let Some(schema) = self.tables.get(table) else {
            return;
        };
        for (column, value) in row.iter_mut() {
            if let Some(ty) = schema.columns.get(column) {
                *value = ty.normalize(std::mem::replace(value, Value::empty_set()));
            }
        }
        let mut add = |column: &str, ty: &ColumnType| {
            if !row.contains_key(column) {
                row.insert(column.to_owned(), ty.default_value());
            }
        };
        match fill {
            Some(columns) => {
                for column in columns {
                    if let Some(ty) = schema.columns.get(column) {
                        add(column, ty);
                    }
                }
            }
            None => {
                for (column, ty) in &schema.columns {
                    add(column, ty);
                }
            }
        }
    }
}

fn parse_atomic(json: &Json) -> Result<AtomicType, String> {
    let name = match json {
        Json::String(name) => name.as_str(),
        Json::Object(base) => base.get("type").and_then(Json::as_str).ok_or("base type without \"type\"")?,
        _ => return Err(format!("bad base type {json}")),
    };
    Ok(match name {
        "integer" => AtomicType::Integer,
        "real" => AtomicType::Real,
        "boolean" => AtomicType::Boolean,
        "string" => AtomicType::String,
        "uuid" => AtomicType::Uuid,
        other => return Err(format!("unknown atomic type {other:?}")),
    })
}

fn parse_type(json: &Json) -> Result<ColumnType, String> {
    let Json::Object(ty) = json else {
        return Ok(ColumnType { key: parse_atomic(json)?, value: None, min: 1, max: Some(1) });
    };
    let key = parse_atomic(ty.get("key").ok_or("type without \"key\"")?)?;
    let value = ty.get("value").map(parse_atomic).transpose()?;
    let min = match ty.get("min") {
        None => 1,
        Some(min) => min.as_u64().ok_or_else(|| format!("bad min {min}"))?,
    };
    let max = match ty.get("max") {
        None => Some(1),
        Some(Json::String(s)) if s == "unlimited" => None,
        Some(max) => Some(max.as_u64().ok_or_else(|| format!("bad max {max}"))?),
    };
    Ok(ColumnType { key, value, min, max })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::from_json(&json!({
            "name": "Test", "version": "1.0.0",
            "tables": {
                "T": {
                    "isRoot": true,
                    "indexes": [["name"]],
                    "columns": {
                        "name": {"type": "string"},
                        "n": {"type": {"key": {"type": "integer", "minInteger": 0}}},
                        "opt": {"type": {"key": "integer", "min": 0, "max": 1}},
                        "many": {"type": {"key": "string", "min": 0, "max": "unlimited"}},
                        "ids": {"type": {"key": "string", "value": "string", "min": 0, "max": "unlimited"}},
                        "ref": {"type": {"key": {"type": "uuid", "refTable": "T"}, "min": 0, "max": 1}}
                    }
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn types_parse() {
        let s = schema();
        assert_eq!((s.name.as_str(), s.version.as_str()), ("Test", "1.0.0"));
        let t = &s.tables["T"];
        assert!(t.is_root);
        assert_eq!(t.indexes, vec![vec!["name".to_owned()]]);
        assert!(s.column_type("T", "name").unwrap().is_scalar());
        assert!(s.column_type("T", "n").unwrap().is_scalar());
        assert!(s.column_type("T", "opt").unwrap().is_set());
        assert_eq!(s.column_type("T", "many").unwrap().max, None);
        assert!(s.column_type("T", "ids").unwrap().is_map());
        assert_eq!(s.column_type("T", "_uuid"), Some(ColumnType::UUID));
        assert_eq!(s.column_type("T", "nope"), None);
        assert!(Schema::from_json(&json!({"name": "x"})).is_err());
        assert!(
            Schema::from_json(&json!({"name": "x", "tables": {"T": {"columns": {"c": {"type": "float"}}}}})).is_err()
        );
    }

    #[test]
    fn rows_are_normalized_and_completed() {
        let s = schema();
        let mut row = Row::new();
        row.insert("opt".into(), Value::from(3i64));
        row.insert("name".into(), Value::set(["a"]));
        s.complete_row("T", &mut row, Some(&["name".into(), "opt".into(), "ids".into(), "n".into()]));
        assert_eq!(row["opt"], Value::set([3i64]));
        assert_eq!(row["name"], Value::from("a"));
        assert_eq!(row["ids"], Value::empty_map());
        assert_eq!(row["n"], Value::from(0i64));
        assert!(!row.contains_key("many"), "not monitored");
    }

    #[test]
    fn diffs_apply_like_ovsdb_server_sends_them() {
        let s = schema();
        let ty = |c| s.column_type("T", c).unwrap();

        let mut v = Value::from("a");
        ty("name").apply_diff(&mut v, Value::from("b"));
        assert_eq!(v, Value::from("b"));

        // Optional column: set, changed, cleared (the server sends the new value, or an empty set).
        let mut v = Value::empty_set();
        ty("opt").apply_diff(&mut v, Value::from(1400i64));
        assert_eq!(v, Value::set([1400i64]));
        ty("opt").apply_diff(&mut v, Value::from(1500i64));
        assert_eq!(v, Value::set([1500i64]));
        ty("opt").apply_diff(&mut v, Value::empty_set());
        assert_eq!(v, Value::empty_set());

        // Sets: symmetric difference.
        let mut v = Value::set(["a", "b"]);
        ty("many").apply_diff(&mut v, Value::set(["b", "c"]));
        assert_eq!(v, Value::set(["a", "c"]));
        ty("many").apply_diff(&mut v, Value::from("a"));
        assert_eq!(v, Value::set(["c"]));

        // Maps: same pair removes, new value replaces, new key inserts.
        let mut v = Value::map([("a", "1"), ("b", "2")]);
        ty("ids").apply_diff(&mut v, Value::map([("a", "1"), ("b", "3"), ("c", "4")]));
        assert_eq!(v, Value::map([("b", "3"), ("c", "4")]));
    }
}
