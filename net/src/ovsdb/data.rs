//! OVSDB values in the JSON notation of RFC 7047 §5.1: atoms, sets (`["set", [..]]`), maps (`["map", [[k, v], ..]]`),
//! uuids (`["uuid", ".."]`) and named uuids (`["named-uuid", ".."]`), and rows of them.
//!
//! Without the schema a one-element set cannot be told from an atom (the server writes both bare), so the accessors
//! accept either: [`Value::as_i64`] reads `5` and `["set", [5]]` alike. Rows a [`Monitor`](super::Monitor) keeps
//! are normalized with the schema: set columns are always [`Value::Set`], scalar columns always [`Value::Atom`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::Error as _;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value as Json;
use uuid::Uuid;

/// One row: column name to value.
pub type Row = BTreeMap<String, Value>;

/// An OVSDB atom.
#[derive(Debug, Clone, PartialEq)]
pub enum Atom {
    /// A 64-bit integer.
    Integer(i64),
    /// A real.
    Real(f64),
    /// A boolean.
    Boolean(bool),
    /// A string.
    String(String),
    /// A row's uuid.
    Uuid(Uuid),
    /// A row inserted earlier in the same transaction, by its `uuid-name`.
    NamedUuid(String),
}

/// An OVSDB datum: an atom, a set of atoms, or a map from atoms to atoms.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A single atom (a scalar column, or a set of exactly one element as the server writes it).
    Atom(Atom),
    /// A set, in the server's order.
    Set(Vec<Atom>),
    /// A map, as key/value pairs in the server's order.
    Map(Vec<(Atom, Atom)>),
}

impl Atom {
    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Atom::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The real, or the integer as a real.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Atom::Real(r) => Some(*r),
            Atom::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Atom::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Atom::String(s) => Some(s),
            _ => None,
        }
    }

    /// The uuid, if this is one.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match self {
            Atom::Uuid(u) => Some(*u),
            _ => None,
        }
    }

    /// The JSON notation of this atom.
    pub fn to_json(&self) -> Json {
        match self {
            Atom::Integer(i) => Json::from(*i),
            Atom::Real(r) => Json::from(*r),
            Atom::Boolean(b) => Json::from(*b),
            Atom::String(s) => Json::from(s.as_str()),
            Atom::Uuid(u) => Json::Array(vec!["uuid".into(), u.to_string().into()]),
            Atom::NamedUuid(n) => Json::Array(vec!["named-uuid".into(), n.as_str().into()]),
        }
    }

    /// Parses the JSON notation of an atom.
    pub fn from_json(json: &Json) -> Result<Self, String> {
        match json {
            Json::Number(n) => match n.as_i64() {
                Some(i) => Ok(Atom::Integer(i)),
                None => n.as_f64().map(Atom::Real).ok_or_else(|| format!("number {n} is out of range")),
            },
            Json::Bool(b) => Ok(Atom::Boolean(*b)),
            Json::String(s) => Ok(Atom::String(s.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(tag), Json::String(text)] if tag == "uuid" => {
                    Uuid::parse_str(text).map(Atom::Uuid).map_err(|e| format!("bad uuid {text:?}: {e}"))
                }
                [Json::String(tag), Json::String(name)] if tag == "named-uuid" => Ok(Atom::NamedUuid(name.clone())),
                _ => Err(format!("not an atom: {json}")),
            },
            _ => Err(format!("not an atom: {json}")),
        }
    }
}

impl Value {
    /// The empty set (also what clears an optional column).
    pub fn empty_set() -> Self {
        Value::Set(Vec::new())
    }

    /// The empty map.
    pub fn empty_map() -> Self {
        Value::Map(Vec::new())
    }

    /// A set of atoms.
    pub fn set<A: Into<Atom>>(atoms: impl IntoIterator<Item = A>) -> Self {
        Value::Set(atoms.into_iter().map(Into::into).collect())
    }

    /// A map of key/value atoms.
    pub fn map<K: Into<Atom>, V: Into<Atom>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// A reference to a row inserted in the same transaction under `uuid-name` `name`.
    pub fn named_uuid(name: impl Into<String>) -> Self {
        Value::Atom(Atom::NamedUuid(name.into()))
    }

    /// The single atom of an atom or a one-element set.
    pub fn as_atom(&self) -> Option<&Atom> {
        match self {
            Value::Atom(a) => Some(a),
            Value::Set(atoms) if atoms.len() == 1 => atoms.first(),
            _ => None,
        }
    }

    /// The integer of an atom or a one-element set.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_atom().and_then(Atom::as_i64)
    }

    /// The real (or integer) of an atom or a one-element set.
    pub fn as_f64(&self) -> Option<f64> {
        self.as_atom().and_then(Atom::as_f64)
    }

    /// The boolean of an atom or a one-element set.
    pub fn as_bool(&self) -> Option<bool> {
        self.as_atom().and_then(Atom::as_bool)
    }

    /// The string of an atom or a one-element set.
    pub fn as_str(&self) -> Option<&str> {
        self.as_atom().and_then(Atom::as_str)
    }

    /// The uuid of an atom or a one-element set.
    pub fn as_uuid(&self) -> Option<Uuid> {
        self.as_atom().and_then(Atom::as_uuid)
    }

    /// The elements of a set; an atom is a set of one. `None` for a map.
    pub fn as_set(&self) -> Option<&[Atom]> {
        match self {
            Value::Atom(a) => Some(std::slice::from_ref(a)),
            Value::Set(atoms) => Some(atoms),
            Value::Map(_) => None,
        }
    }

    /// The pairs of a map; an empty set reads as an empty map. `None` otherwise.
    pub fn as_map(&self) -> Option<&[(Atom, Atom)]> {
        match self {
            Value::Map(pairs) => Some(pairs),
            Value::Set(atoms) if atoms.is_empty() => Some(&[]),
            _ => None,
        }
    }

    /// The value of string key `key` in a map.
    pub fn map_get(&self, key: &str) -> Option<&Atom> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// A string-to-string map (such as `external_ids`) as a `BTreeMap`; other pairs are skipped.
    pub fn to_string_map(&self) -> BTreeMap<String, String> {
        self.as_map()
            .unwrap_or_default()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
            .collect()
    }

    /// The JSON notation of this value.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Atom(a) => a.to_json(),
            Value::Set(atoms) => {
                Json::Array(vec!["set".into(), Json::Array(atoms.iter().map(Atom::to_json).collect())])
            }
            Value::Map(pairs) => Json::Array(vec![
                "map".into(),
                Json::Array(pairs.iter().map(|(k, v)| Json::Array(vec![k.to_json(), v.to_json()])).collect()),
            ]),
        }
    }

    /// Parses the JSON notation of a value.
    pub fn from_json(json: &Json) -> Result<Self, String> {
        if let Json::Array(items) = json {
            if let [Json::String(tag), Json::Array(elements)] = items.as_slice() {
                match tag.as_str() {
                    "set" => return elements.iter().map(Atom::from_json).collect::<Result<_, _>>().map(Value::Set),
                    "map" => {
                        return elements
                            .iter()
                            .map(|pair| match pair {
                                Json::Array(kv) if kv.len() == 2 => {
                                    Ok((Atom::from_json(&kv[0])?, Atom::from_json(&kv[1])?))
                                }
                                _ => Err(format!("not a map pair: {pair}")),
                            })
                            .collect::<Result<_, _>>()
                            .map(Value::Map)
                    }
                    _ => {}
                }
            }
        }
        Atom::from_json(json).map(Value::Atom)
    }
}

/// Parses a JSON object of column values (a `<row>`).
pub fn row_from_json(json: &Json) -> Result<Row, String> {
    let Json::Object(columns) = json else {
        return Err(format!("a row is not a JSON object: {json}"));
    };
    columns
        .iter()
        .map(|(column, value)| {
            Value::from_json(value).map(|value| (column.clone(), value)).map_err(|e| format!("column {column}: {e}"))
        })
        .collect()
}

/// The JSON object of a row.
pub fn row_to_json(row: &Row) -> Json {
    Json::Object(row.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
}

impl Serialize for Atom {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Atom::Integer(i) => serializer.serialize_i64(*i),
            Atom::Real(r) => serializer.serialize_f64(*r),
            Atom::Boolean(b) => serializer.serialize_bool(*b),
            Atom::String(s) => serializer.serialize_str(s),
            Atom::Uuid(u) => {
                let mut seq = serializer.serialize_seq(Some(2))?;
                seq.serialize_element("uuid")?;
                seq.serialize_element(&u.hyphenated().to_string())?;
                seq.end()
            }
            Atom::NamedUuid(n) => {
                let mut seq = serializer.serialize_seq(Some(2))?;
                seq.serialize_element("named-uuid")?;
                seq.serialize_element(n)?;
                seq.end()
            }
        }
    }
}

struct Pair<'a>(&'a Atom, &'a Atom);

impl Serialize for Pair<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(2))?;
        seq.serialize_element(self.0)?;
        seq.serialize_element(self.1)?;
        seq.end()
    }
}

struct Elements<'a, T>(&'a [T]);

impl<T: Serialize> Serialize for Elements<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0)
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Atom(a) => a.serialize(serializer),
            Value::Set(atoms) => {
                let mut seq = serializer.serialize_seq(Some(2))?;
                seq.serialize_element("set")?;
                seq.serialize_element(&Elements(atoms))?;
                seq.end()
            }
            Value::Map(pairs) => {
                let pairs: Vec<Pair<'_>> = pairs.iter().map(|(k, v)| Pair(k, v)).collect();
                let mut seq = serializer.serialize_seq(Some(2))?;
                seq.serialize_element("map")?;
                seq.serialize_element(&Elements(&pairs))?;
                seq.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Atom {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Atom::from_json(&Json::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::from_json(&Json::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Integer(i) => write!(f, "{i}"),
            Atom::Real(r) => write!(f, "{r}"),
            Atom::Boolean(b) => write!(f, "{b}"),
            Atom::String(s) => write!(f, "{s:?}"),
            Atom::Uuid(u) => write!(f, "{u}"),
            Atom::NamedUuid(n) => write!(f, "@{n}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

macro_rules! atom_from {
    ($($t:ty => $variant:ident($conv:expr)),* $(,)?) => {$(
        impl From<$t> for Atom {
            fn from(v: $t) -> Self {
                Atom::$variant($conv(v))
            }
        }
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Atom(Atom::from(v))
            }
        }
    )*};
}

atom_from!(
    i64 => Integer(|v| v),
    i32 => Integer(i64::from),
    u32 => Integer(i64::from),
    u16 => Integer(i64::from),
    f64 => Real(|v| v),
    bool => Boolean(|v| v),
    String => String(|v| v),
    &str => String(str::to_owned),
    &String => String(String::clone),
    Uuid => Uuid(|v| v),
);

impl From<Atom> for Value {
    fn from(atom: Atom) -> Self {
        Value::Atom(atom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn atoms_round_trip() {
        let uuid = Uuid::parse_str("539ab4cc-85e2-4afd-8fca-c43ed913e701").unwrap();
        for (atom, json) in [
            (Atom::Integer(-3), json!(-3)),
            (Atom::Real(1.5), json!(1.5)),
            (Atom::Boolean(true), json!(true)),
            (Atom::String("br0".into()), json!("br0")),
            (Atom::Uuid(uuid), json!(["uuid", "539ab4cc-85e2-4afd-8fca-c43ed913e701"])),
            (Atom::NamedUuid("p".into()), json!(["named-uuid", "p"])),
        ] {
            assert_eq!(serde_json::to_value(&atom).unwrap(), json);
            assert_eq!(atom.to_json(), json);
            assert_eq!(Atom::from_json(&json).unwrap(), atom);
            assert_eq!(serde_json::from_value::<Atom>(json).unwrap(), atom);
        }
    }

    #[test]
    fn sets_and_maps_round_trip() {
        for (value, json) in [
            (Value::set([1i64, 2]), json!(["set", [1, 2]])),
            (Value::empty_set(), json!(["set", []])),
            (Value::map([("vm-id", "x"), ("iface-id", "y")]), json!(["map", [["vm-id", "x"], ["iface-id", "y"]]])),
            (Value::empty_map(), json!(["map", []])),
            (Value::from(5i64), json!(5)),
        ] {
            assert_eq!(serde_json::to_value(&value).unwrap(), json);
            assert_eq!(value.to_json(), json);
            assert_eq!(Value::from_json(&json).unwrap(), value);
        }
    }

    #[test]
    fn accessors_accept_atoms_and_singleton_sets() {
        assert_eq!(Value::from(7i64).as_i64(), Some(7));
        assert_eq!(Value::set([7i64]).as_i64(), Some(7));
        assert_eq!(Value::empty_set().as_i64(), None);
        assert_eq!(Value::set([1i64, 2]).as_i64(), None);
        assert_eq!(Value::from("x").as_set().unwrap().len(), 1);
        assert_eq!(Value::empty_set().as_map().unwrap().len(), 0);
        let ids = Value::map([("vm-id", "a"), ("attached-mac", "b")]);
        assert_eq!(ids.map_get("attached-mac").and_then(Atom::as_str), Some("b"));
        assert_eq!(ids.to_string_map().len(), 2);
        assert_eq!(Value::from(3i64).as_f64(), Some(3.0));
    }

    #[test]
    fn malformed_values_are_errors() {
        for bad in [
            json!(null),
            json!({}),
            json!(["uuid", "not-a-uuid"]),
            json!(["set", [["x"]]]),
            json!(["map", [[1]]]),
            json!(["other", 1]),
            json!([1, 2, 3]),
        ] {
            assert!(Value::from_json(&bad).is_err(), "{bad}");
        }
        assert!(row_from_json(&json!([1])).is_err());
        let row = row_from_json(&json!({"name": "p1", "ofport": 1})).unwrap();
        assert_eq!(row["ofport"].as_i64(), Some(1));
        assert_eq!(row_to_json(&row), json!({"name": "p1", "ofport": 1}));
    }
}
