//! Small typed readers for fields of Automerge maps, shared by the typed accessors.
//!
//! Readers are lenient: a missing field or a field of an unexpected type reads as `None`, so a
//! document written by a newer (or buggy) peer never makes a view fail.

use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value};

use crate::document::scalar_u64;

/// The value at `key` of map `obj`, if any.
fn get<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<(Value<'static>, ObjId)> {
    doc.get(obj, key)
        .ok()
        .flatten()
        .map(|(v, id)| (v.into_owned(), id))
}

/// The scalar at `key`.
pub(crate) fn scalar<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<ScalarValue> {
    match get(doc, obj, key)? {
        (Value::Scalar(s), _) => Some(s.into_owned()),
        _ => None,
    }
}

/// A string at `key`: a scalar string or a text object.
pub(crate) fn string<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<String> {
    match get(doc, obj, key)? {
        (Value::Scalar(s), _) => s.as_str().map(str::to_owned),
        (Value::Object(ObjType::Text), id) => doc.text(&id).ok(),
        _ => None,
    }
}

/// A signed integer at `key`.
pub(crate) fn int<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<i64> {
    match scalar(doc, obj, key)? {
        ScalarValue::F64(_) => None,
        s => s.as_i64(),
    }
}

/// A non-negative integer at `key`.
pub(crate) fn uint<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<u64> {
    scalar_u64(&scalar(doc, obj, key)?)
}

/// A boolean at `key`.
pub(crate) fn boolean<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<bool> {
    scalar(doc, obj, key)?.as_bool()
}

/// The child object at `key` if it has type `want` (maps and tables are interchangeable).
pub(crate) fn object<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str, want: ObjType) -> Option<ObjId> {
    match get(doc, obj, key)? {
        (Value::Object(t), id) if same_type(t, want) => Some(id),
        _ => None,
    }
}

/// The child object at list index `i` if it has type `want`.
pub(crate) fn object_at<R: ReadDoc>(
    doc: &R,
    list: &ObjId,
    i: usize,
    want: ObjType,
) -> Option<ObjId> {
    match doc.get(list, i).ok().flatten()? {
        (Value::Object(t), id) if same_type(t, want) => Some(id),
        _ => None,
    }
}

fn same_type(a: ObjType, b: ObjType) -> bool {
    let norm = |t| if t == ObjType::Table { ObjType::Map } else { t };
    norm(a) == norm(b)
}

/// Every field of one map, read in one pass: one `map_range` over the map instead of one
/// lookup per field, which costs Automerge a seek each (reading a 12-field message field by
/// field made listing a conversation cost ~60 µs per message).
pub(crate) struct MapFields(Vec<(String, Value<'static>, ObjId)>);

impl MapFields {
    /// Reads map `obj`.
    pub(crate) fn read<R: ReadDoc>(doc: &R, obj: &ObjId) -> MapFields {
        MapFields(
            doc.map_range(obj, ..)
                .map(|item| {
                    let id = item.id();
                    (item.key.into_owned(), item.value.into_value(), id)
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<(&Value<'static>, &ObjId)> {
        self.0
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, id)| (v, id))
    }

    fn scalar(&self, key: &str) -> Option<&ScalarValue> {
        match self.get(key)? {
            (Value::Scalar(s), _) => Some(s.as_ref()),
            _ => None,
        }
    }

    /// A string at `key`: a scalar string or a text object (read from `doc`).
    pub(crate) fn string<R: ReadDoc>(&self, doc: &R, key: &str) -> Option<String> {
        match self.get(key)? {
            (Value::Scalar(s), _) => s.as_str().map(str::to_owned),
            (Value::Object(ObjType::Text), id) => doc.text(id).ok(),
            _ => None,
        }
    }

    /// A signed integer at `key`.
    pub(crate) fn int(&self, key: &str) -> Option<i64> {
        match self.scalar(key)? {
            ScalarValue::F64(_) => None,
            s => s.as_i64(),
        }
    }

    /// A non-negative integer at `key`.
    pub(crate) fn uint(&self, key: &str) -> Option<u64> {
        scalar_u64(self.scalar(key)?)
    }

    /// A boolean at `key`.
    pub(crate) fn boolean(&self, key: &str) -> Option<bool> {
        self.scalar(key)?.as_bool()
    }

    /// The child object at `key` if it has type `want`.
    pub(crate) fn object(&self, key: &str, want: ObjType) -> Option<ObjId> {
        match self.get(key)? {
            (Value::Object(t), id) if same_type(*t, want) => Some(id.clone()),
            _ => None,
        }
    }
}

/// The maps in list `list` (within `range`), with their indexes, in one pass over the list
/// (a lookup by index costs Automerge a walk of the list each time). Other elements are
/// skipped.
pub(crate) fn maps_in<R: ReadDoc>(
    doc: &R,
    list: &ObjId,
    range: impl std::ops::RangeBounds<usize>,
) -> Vec<(usize, ObjId)> {
    doc.list_range(list, range)
        .filter(|item| {
            matches!(
                item.value,
                automerge::ValueRef::Object(ObjType::Map | ObjType::Table)
            )
        })
        .map(|item| (item.index, item.id()))
        .collect()
}
