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
