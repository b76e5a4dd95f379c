//! Transaction operations (RFC 7047 §5.2) and their results.

use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};
use serde_json::Value as Json;
use uuid::Uuid;

use super::data::{row_from_json, Row, Value};

/// A comparison in a `where` clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `includes`: the column holds every element (or pair) of the value.
    Includes,
    /// `excludes`: the column holds none of the elements (or pairs) of the value.
    Excludes,
}

impl Function {
    fn as_str(self) -> &'static str {
        match self {
            Function::Lt => "<",
            Function::Le => "<=",
            Function::Eq => "==",
            Function::Ne => "!=",
            Function::Ge => ">=",
            Function::Gt => ">",
            Function::Includes => "includes",
            Function::Excludes => "excludes",
        }
    }
}

/// `[column, function, value]`: one clause of a `where`; a row matches a `where` when every clause holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The column, e.g. `name` or `_uuid`.
    pub column: String,
    /// The comparison.
    pub function: Function,
    /// The value compared with.
    pub value: Value,
}

impl Condition {
    /// `[column, function, value]`.
    pub fn new(column: impl Into<String>, function: Function, value: impl Into<Value>) -> Self {
        Self { column: column.into(), function, value: value.into() }
    }

    /// `column == value`.
    pub fn eq(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Function::Eq, value)
    }

    /// `column != value`.
    pub fn ne(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Function::Ne, value)
    }

    /// `column includes value`.
    pub fn includes(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Function::Includes, value)
    }

    /// `_uuid == uuid`.
    pub fn uuid(uuid: Uuid) -> Self {
        Self::eq("_uuid", uuid)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(3)?;
        t.serialize_element(&self.column)?;
        t.serialize_element(self.function.as_str())?;
        t.serialize_element(&self.value)?;
        t.end()
    }
}

/// How a `mutate` changes a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutator {
    /// `+=`
    Add,
    /// `-=`
    Sub,
    /// `*=`
    Mul,
    /// `/=`
    Div,
    /// `%=`
    Mod,
    /// `insert`: adds elements to a set, or pairs whose key is absent to a map.
    Insert,
    /// `delete`: removes elements from a set, or pairs (or keys, given a set) from a map.
    Delete,
}

impl Mutator {
    fn as_str(self) -> &'static str {
        match self {
            Mutator::Add => "+=",
            Mutator::Sub => "-=",
            Mutator::Mul => "*=",
            Mutator::Div => "/=",
            Mutator::Mod => "%=",
            Mutator::Insert => "insert",
            Mutator::Delete => "delete",
        }
    }
}

/// `[column, mutator, value]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// The column.
    pub column: String,
    /// The change.
    pub mutator: Mutator,
    /// The operand.
    pub value: Value,
}

impl Mutation {
    /// `[column, mutator, value]`.
    pub fn new(column: impl Into<String>, mutator: Mutator, value: impl Into<Value>) -> Self {
        Self { column: column.into(), mutator, value: value.into() }
    }

    /// Inserts the elements (set) or pairs (map) of `value`.
    pub fn insert(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Mutator::Insert, value)
    }

    /// Deletes the elements, pairs or keys of `value`.
    pub fn delete(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Mutator::Delete, value)
    }

    /// Adds `value` to an integer or real column.
    pub fn add(column: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::new(column, Mutator::Add, value)
    }
}

impl Serialize for Mutation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(3)?;
        t.serialize_element(&self.column)?;
        t.serialize_element(self.mutator.as_str())?;
        t.serialize_element(&self.value)?;
        t.end()
    }
}

/// What a `wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WaitUntil {
    /// Until the selected rows equal `rows`.
    #[serde(rename = "==")]
    Eq,
    /// Until they differ from `rows`.
    #[serde(rename = "!=")]
    Ne,
}

/// One operation of a transaction. Build them with the constructors ([`Operation::insert`], ...).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Operation {
    /// Inserts a row; `uuid_name` lets later operations of the transaction refer to it
    /// ([`Value::named_uuid`]).
    Insert {
        /// Table.
        table: String,
        /// Column values; the others take their defaults.
        row: Row,
        /// The `uuid-name`.
        #[serde(rename = "uuid-name", skip_serializing_if = "Option::is_none")]
        uuid_name: Option<String>,
    },
    /// Returns matching rows (all columns, or `columns`).
    Select {
        /// Table.
        table: String,
        /// Conditions; empty matches every row.
        #[serde(rename = "where")]
        conditions: Vec<Condition>,
        /// Columns to return; all when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        columns: Option<Vec<String>>,
    },
    /// Sets columns of matching rows.
    Update {
        /// Table.
        table: String,
        /// Conditions.
        #[serde(rename = "where")]
        conditions: Vec<Condition>,
        /// New column values.
        row: Row,
    },
    /// Changes columns of matching rows in place (safe against concurrent writers, unlike read-modify-update).
    Mutate {
        /// Table.
        table: String,
        /// Conditions.
        #[serde(rename = "where")]
        conditions: Vec<Condition>,
        /// Changes.
        mutations: Vec<Mutation>,
    },
    /// Deletes matching rows.
    Delete {
        /// Table.
        table: String,
        /// Conditions.
        #[serde(rename = "where")]
        conditions: Vec<Condition>,
    },
    /// Waits until the `columns` of matching rows equal (or differ from) `rows`, at most `timeout` ms (`Some(0)`:
    /// fail at once, a precondition; `None`: forever). A timed-out `wait` fails the whole transaction.
    Wait {
        /// Table.
        table: String,
        /// Conditions.
        #[serde(rename = "where")]
        conditions: Vec<Condition>,
        /// Compared columns.
        columns: Vec<String>,
        /// Equal or different.
        until: WaitUntil,
        /// Expected rows (only `columns`).
        rows: Vec<Row>,
        /// Milliseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// Asks for a durable (fsynced) commit.
    Commit {
        /// Whether the commit must be durable.
        durable: bool,
    },
    /// Aborts the transaction (always fails it).
    Abort,
    /// Adds a comment to the database log (`ovsdb-tool show-log`).
    Comment {
        /// The text.
        comment: String,
    },
    /// Fails the transaction unless this client holds `lock`.
    Assert {
        /// The lock name.
        lock: String,
    },
}

impl Operation {
    /// `insert` without a `uuid-name`.
    pub fn insert(table: impl Into<String>, row: Row) -> Self {
        Operation::Insert { table: table.into(), row, uuid_name: None }
    }

    /// `insert` whose row later operations refer to as `Value::named_uuid(uuid_name)`.
    pub fn insert_named(table: impl Into<String>, row: Row, uuid_name: impl Into<String>) -> Self {
        Operation::Insert { table: table.into(), row, uuid_name: Some(uuid_name.into()) }
    }

    /// `select` of all columns.
    pub fn select(table: impl Into<String>, conditions: Vec<Condition>) -> Self {
        Operation::Select { table: table.into(), conditions, columns: None }
    }

    /// `select` of some columns.
    pub fn select_columns(table: impl Into<String>, conditions: Vec<Condition>, columns: &[&str]) -> Self {
        Operation::Select {
            table: table.into(),
            conditions,
            columns: Some(columns.iter().map(|c| (*c).to_owned()).collect()),
        }
    }

    /// `update`.
    pub fn update(table: impl Into<String>, conditions: Vec<Condition>, row: Row) -> Self {
        Operation::Update { table: table.into(), conditions, row }
    }

    /// `mutate`.
    pub fn mutate(table: impl Into<String>, conditions: Vec<Condition>, mutations: Vec<Mutation>) -> Self {
        Operation::Mutate { table: table.into(), conditions, mutations }
    }

    /// `delete`.
    pub fn delete(table: impl Into<String>, conditions: Vec<Condition>) -> Self {
        Operation::Delete { table: table.into(), conditions }
    }

    /// `wait`.
    pub fn wait(
        table: impl Into<String>,
        conditions: Vec<Condition>,
        columns: &[&str],
        until: WaitUntil,
        rows: Vec<Row>,
        timeout_ms: Option<u64>,
    ) -> Self {
        Operation::Wait {
            table: table.into(),
            conditions,
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            until,
            rows,
            timeout: timeout_ms,
        }
    }

    /// A precondition: the transaction fails at once (at this operation) if any row matches `conditions`.
    pub fn assert_absent(table: impl Into<String>, conditions: Vec<Condition>) -> Self {
        Self::wait(table, conditions, &["_uuid"], WaitUntil::Eq, Vec::new(), Some(0))
    }

    /// `comment`.
    pub fn comment(text: impl Into<String>) -> Self {
        Operation::Comment { comment: text.into() }
    }

    /// `commit`.
    pub fn commit(durable: bool) -> Self {
        Operation::Commit { durable }
    }

    /// The operation's name, e.g. `insert`.
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::Insert { .. } => "insert",
            Operation::Select { .. } => "select",
            Operation::Update { .. } => "update",
            Operation::Mutate { .. } => "mutate",
            Operation::Delete { .. } => "delete",
            Operation::Wait { .. } => "wait",
            Operation::Commit { .. } => "commit",
            Operation::Abort => "abort",
            Operation::Comment { .. } => "comment",
            Operation::Assert { .. } => "assert",
        }
    }
}

/// The result of one successful operation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationResult {
    /// `insert`: the new row's uuid.
    pub uuid: Option<Uuid>,
    /// `select`: the rows (values as the server wrote them; see [`Value`]'s accessors).
    pub rows: Option<Vec<Row>>,
    /// `update`, `mutate`, `delete`: how many rows matched.
    pub count: Option<u64>,
}

impl OperationResult {
    pub(crate) fn from_json(json: &Json) -> Result<Self, String> {
        let Json::Object(members) = json else {
            return Err(format!("operation result is not an object: {json}"));
        };
        let uuid = match members.get("uuid") {
            None => None,
            Some(uuid) => match Value::from_json(uuid)?.as_uuid() {
                Some(uuid) => Some(uuid),
                None => return Err(format!("bad uuid {uuid}")),
            },
        };
        let rows = match members.get("rows") {
            None => None,
            Some(Json::Array(rows)) => Some(rows.iter().map(row_from_json).collect::<Result<_, _>>()?),
            Some(other) => return Err(format!("bad rows {other}")),
        };
        let count = match members.get("count") {
            None => None,
            Some(count) => Some(count.as_u64().ok_or_else(|| format!("bad count {count}"))?),
        };
        Ok(Self { uuid, rows, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn operations_serialize_per_rfc7047() {
        let mut row = Row::new();
        row.insert("name".into(), "p1".into());
        row.insert("interfaces".into(), Value::named_uuid("i"));
        let uuid = Uuid::parse_str("539ab4cc-85e2-4afd-8fca-c43ed913e701").unwrap();
        let ops = [
            Operation::insert_named("Port", row.clone(), "p"),
            Operation::insert("Port", Row::new()),
            Operation::select_columns("Interface", vec![Condition::eq("name", "p1")], &["ofport"]),
            Operation::update("Interface", vec![Condition::uuid(uuid)], Row::new()),
            Operation::mutate(
                "Bridge",
                vec![Condition::eq("name", "br0")],
                vec![Mutation::insert("ports", Value::set([Value::named_uuid("p").as_atom().unwrap().clone()]))],
            ),
            Operation::delete("Port", vec![Condition::ne("name", "x")]),
            Operation::assert_absent("Port", vec![Condition::eq("name", "p1")]),
            Operation::comment("hello"),
            Operation::commit(false),
            Operation::Abort,
            Operation::Assert { lock: "l".into() },
        ];
        assert_eq!(
            serde_json::to_value(&ops).unwrap(),
            json!([
                {"op": "insert", "table": "Port", "row": {"interfaces": ["named-uuid", "i"], "name": "p1"}, "uuid-name": "p"},
                {"op": "insert", "table": "Port", "row": {}},
                {"op": "select", "table": "Interface", "where": [["name", "==", "p1"]], "columns": ["ofport"]},
                {"op": "update", "table": "Interface", "where": [["_uuid", "==", ["uuid", "539ab4cc-85e2-4afd-8fca-c43ed913e701"]]], "row": {}},
                {"op": "mutate", "table": "Bridge", "where": [["name", "==", "br0"]], "mutations": [["ports", "insert", ["set", [["named-uuid", "p"]]]]]},
                {"op": "delete", "table": "Port", "where": [["name", "!=", "x"]]},
                {"op": "wait", "table": "Port", "where": [["name", "==", "p1"]], "columns": ["_uuid"], "until": "==", "rows": [], "timeout": 0},
                {"op": "comment", "comment": "hello"},
                {"op": "commit", "durable": false},
                {"op": "abort"},
                {"op": "assert", "lock": "l"},
            ])
        );
        assert_eq!(ops.iter().map(Operation::kind).collect::<Vec<_>>()[..3], ["insert", "insert", "select"]);
    }

    #[test]
    fn results_parse() {
        let r = OperationResult::from_json(&json!({"uuid": ["uuid", "539ab4cc-85e2-4afd-8fca-c43ed913e701"]})).unwrap();
        assert!(r.uuid.is_some() && r.rows.is_none() && r.count.is_none());
        let r = OperationResult::from_json(&json!({"rows": [{"ofport": 3}]})).unwrap();
        assert_eq!(r.rows.unwrap()[0]["ofport"].as_i64(), Some(3));
        assert_eq!(OperationResult::from_json(&json!({"count": 2})).unwrap().count, Some(2));
        assert_eq!(OperationResult::from_json(&json!({})).unwrap(), OperationResult::default());
        assert!(OperationResult::from_json(&json!({"uuid": "x"})).is_err());
        assert!(OperationResult::from_json(&json!(null)).is_err());
    }
}
