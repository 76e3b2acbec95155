//! JSON views of documents and path-based edits (`iom doc get/put/rm`).
//!
//! Paths are dot separated: `a.b.0.c`. In a map a segment is a key (even if it looks like a
//! number); in a list it must be an index. The root itself cannot be written or deleted, and
//! the root fields `kind` and `schema_version` are reserved.
//!
//! Conversions:
//!
//! | Automerge | JSON |
//! |---|---|
//! | map, table | object |
//! | list | array |
//! | text | string |
//! | str, bool, null | same |
//! | int, uint, f64, counter, timestamp | number (non-finite f64 → null) |
//! | bytes | lowercase hex string |
//!
//! Writing: JSON objects and arrays become new Automerge maps and lists; strings become scalar
//! strings, except that a string written over an existing text object updates that text in place
//! (a diff, so concurrent edits merge).
//!
//! Concurrency: writes into an existing map or list merge with other devices' writes. Two
//! devices that each *create* the same missing intermediate map (or replace a value with a new
//! object) concurrently create two objects; Automerge keeps one and the other's contents are
//! not visible. Create shared containers first (the typed documents do so in their first change).

use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map as JsonMap, Number, Value as Json};

use crate::document::{Document, FIELD_KIND, FIELD_SCHEMA_VERSION};

/// Maximum nesting accepted when writing JSON and produced when reading documents.
pub const MAX_JSON_DEPTH: usize = 64;

/// Why a path edit or lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty (or `.`): the root cannot be replaced.
    #[error("empty path: the document root cannot be replaced")]
    EmptyPath,
    /// A segment is empty, or is not an index where the parent is a list.
    #[error("bad path segment {segment:?}")]
    BadSegment {
        /// The offending segment.
        segment: String,
    },
    /// The value at `path` is a scalar or a text, so it has no children.
    #[error("{path} is not a map or a list")]
    NotAContainer {
        /// Path of the scalar.
        path: String,
    },
    /// Nothing exists at `path` (only for reads and deletes).
    #[error("nothing at {path}")]
    NotFound {
        /// The missing path.
        path: String,
    },
    /// A list index past the end (writing at `index == len` appends).
    #[error("index {index} out of range at {path} (length {len})")]
    IndexOutOfRange {
        /// The list path with the index.
        path: String,
        /// Requested index.
        index: usize,
        /// Length of the list.
        len: usize,
    },
    /// The root field is managed by iom (`kind`, `schema_version`).
    #[error("{0} is a reserved field")]
    ReservedField(String),
    /// The JSON value nests deeper than [`MAX_JSON_DEPTH`].
    #[error("value nests deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
}

impl From<AutomergeError> for PathError {
    fn from(e: AutomergeError) -> Self {
        PathError::Automerge(Box::new(e))
    }
}

/// Where to write inside a container.
#[derive(Clone, Copy)]
pub(crate) enum At<'a> {
    Key(&'a str),
    Replace(usize),
    Insert(usize),
}

impl Document {
    /// The whole document as JSON.
    pub fn to_json(&self) -> Json {
        obj_to_json(self.automerge(), &ROOT, ObjType::Map, 0)
    }

    /// The JSON value at `path`, or `None` if nothing is there.
    pub fn get_json(&self, path: &str) -> Result<Option<Json>, PathError> {
        let segs = split_path(path)?;
        let doc = self.automerge();
        let (last, parents) = segs.split_last().ok_or(PathError::EmptyPath)?;
        let Some((obj, typ)) = walk(doc, parents)? else {
            return Ok(None);
        };
        let prop = match typ {
            ObjType::Map | ObjType::Table => automerge::Prop::Map((*last).to_owned()),
            ObjType::List => automerge::Prop::Seq(parse_index(last)?),
            ObjType::Text => return Err(not_a_container(parents)),
        };
        Ok(doc
            .get(&obj, prop)?
            .map(|(v, id)| value_to_json(doc, v, &id, 0)))
    }

    /// Writes `value` at `path` as one change, creating missing intermediate maps.
    pub fn put_json(
        &mut self,
        path: &str,
        value: Json,
        message: &str,
        now: i64,
    ) -> Result<(), PathError> {
        let segs = split_path(path)?;
        check_reserved(&segs)?;
        check_depth(&value, 0)?;
        self.change(message, now, |tx| {
            let (last, parents) = segs.split_last().ok_or(PathError::EmptyPath)?;
            let (obj, typ) = walk_create(tx, parents)?;
            let at = match typ {
                ObjType::Map | ObjType::Table => At::Key(last),
                ObjType::List => {
                    let index = parse_index(last)?;
                    let len = tx.length(&obj);
                    if index < len {
                        At::Replace(index)
                    } else if index == len {
                        At::Insert(index)
                    } else {
                        return Err(PathError::IndexOutOfRange {
                            path: segs.join("."),
                            index,
                            len,
                        });
                    }
                }
                ObjType::Text => return Err(not_a_container(parents)),
            };
            // A string over an existing text object edits the text in place.
            if let Json::String(s) = &value
                && let Some(text) = existing_text(tx, &obj, at)?
            {
                tx.update_text(&text, s)?;
                return Ok(());
            }
            write_json(tx, &obj, at, &value, 0)
        })
    }

    /// Deletes the value at `path` as one change. Returns `false` if a map key was absent.
    pub fn delete_path(&mut self, path: &str, message: &str, now: i64) -> Result<bool, PathError> {
        let segs = split_path(path)?;
        check_reserved(&segs)?;
        self.change(message, now, |tx| {
            let (last, parents) = segs.split_last().ok_or(PathError::EmptyPath)?;
            let Some((obj, typ)) = walk(tx, parents)? else {
                return Err(PathError::NotFound {
                    path: parents.join("."),
                });
            };
            match typ {
                ObjType::Map | ObjType::Table => {
                    if tx.get(&obj, *last)?.is_none() {
                        return Ok(false);
                    }
                    tx.delete(&obj, *last)?;
                    Ok(true)
                }
                ObjType::List => {
                    let index = parse_index(last)?;
                    let len = tx.length(&obj);
                    if index >= len {
                        return Err(PathError::IndexOutOfRange {
                            path: segs.join("."),
                            index,
                            len,
                        });
                    }
                    tx.delete(&obj, index)?;
                    Ok(true)
                }
                ObjType::Text => Err(not_a_container(parents)),
            }
        })
    }
}

fn split_path(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() || path == "." {
        return Err(PathError::EmptyPath);
    }
    let segs: Vec<&str> = path.split('.').collect();
    if let Some(bad) = segs.iter().find(|s| s.is_empty()) {
        return Err(PathError::BadSegment {
            segment: (*bad).to_owned(),
        });
    }
    Ok(segs)
}

fn check_reserved(segs: &[&str]) -> Result<(), PathError> {
    match segs.first() {
        Some(&f) if f == FIELD_KIND || f == FIELD_SCHEMA_VERSION => {
            Err(PathError::ReservedField(f.to_owned()))
        }
        _ => Ok(()),
    }
}

fn check_depth(v: &Json, depth: usize) -> Result<(), PathError> {
    if depth > MAX_JSON_DEPTH {
        return Err(PathError::TooDeep {
            max: MAX_JSON_DEPTH,
        });
    }
    match v {
        Json::Array(a) => a.iter().try_for_each(|x| check_depth(x, depth + 1)),
        Json::Object(o) => o.values().try_for_each(|x| check_depth(x, depth + 1)),
        _ => Ok(()),
    }
}

fn parse_index(seg: &str) -> Result<usize, PathError> {
    let bad = || PathError::BadSegment {
        segment: seg.to_owned(),
    };
    if !seg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    seg.parse().map_err(|_| bad())
}

fn not_a_container(path: &[&str]) -> PathError {
    PathError::NotAContainer {
        path: path.join("."),
    }
}

/// Follows `segs` from the root. `Ok(None)` if something along the way is missing.
fn walk<R: ReadDoc>(doc: &R, segs: &[&str]) -> Result<Option<(ObjId, ObjType)>, PathError> {
    let mut obj = ROOT;
    let mut typ = ObjType::Map;
    for (i, seg) in segs.iter().enumerate() {
        let got = match typ {
            ObjType::Map | ObjType::Table => doc.get(&obj, *seg)?,
            ObjType::List => {
                let index = parse_index(seg)?;
                doc.get(&obj, index)?
            }
            ObjType::Text => return Err(not_a_container(&segs[..i])),
        };
        match got {
            None => return Ok(None),
            Some((Value::Object(t), id)) => {
                obj = id;
                typ = t;
            }
            Some((Value::Scalar(_), _)) => return Err(not_a_container(&segs[..=i])),
        }
    }
    Ok(Some((obj, typ)))
}

/// Follows `segs` from the root, creating missing map entries as maps.
fn walk_create(tx: &mut Transaction<'_>, segs: &[&str]) -> Result<(ObjId, ObjType), PathError> {
    let mut obj = ROOT;
    let mut typ = ObjType::Map;
    for (i, seg) in segs.iter().enumerate() {
        let got = match typ {
            ObjType::Map | ObjType::Table => match tx.get(&obj, *seg)? {
                Some(found) => found,
                None => {
                    obj = tx.put_object(&obj, *seg, ObjType::Map)?;
                    typ = ObjType::Map;
                    continue;
                }
            },
            ObjType::List => {
                let index = parse_index(seg)?;
                let len = tx.length(&obj);
                match tx.get(&obj, index)? {
                    Some(found) => found,
                    None => {
                        return Err(PathError::IndexOutOfRange {
                            path: segs[..=i].join("."),
                            index,
                            len,
                        });
                    }
                }
            }
            ObjType::Text => return Err(not_a_container(&segs[..i])),
        };
        match got {
            (Value::Object(t), id) => {
                obj = id;
                typ = t;
            }
            (Value::Scalar(_), _) => return Err(not_a_container(&segs[..=i])),
        }
    }
    Ok((obj, typ))
}

fn existing_text(
    tx: &Transaction<'_>,
    obj: &ObjId,
    at: At<'_>,
) -> Result<Option<ObjId>, AutomergeError> {
    let got = match at {
        At::Key(k) => tx.get(obj, k)?,
        At::Replace(i) => tx.get(obj, i)?,
        At::Insert(_) => None,
    };
    Ok(match got {
        Some((Value::Object(ObjType::Text), id)) => Some(id),
        _ => None,
    })
}

/// Writes a scalar at `at` in `obj`.
pub(crate) fn write_scalar(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    at: At<'_>,
    v: ScalarValue,
) -> Result<(), AutomergeError> {
    match at {
        At::Key(k) => tx.put(obj, k, v),
        At::Replace(i) => tx.put(obj, i, v),
        At::Insert(i) => tx.insert(obj, i, v),
    }
}

/// Creates a new object at `at` in `obj`.
pub(crate) fn write_object(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    at: At<'_>,
    t: ObjType,
) -> Result<ObjId, AutomergeError> {
    match at {
        At::Key(k) => tx.put_object(obj, k, t),
        At::Replace(i) => tx.put_object(obj, i, t),
        At::Insert(i) => tx.insert_object(obj, i, t),
    }
}

/// Writes a JSON value (recursively) at `at` in `obj`.
pub(crate) fn write_json(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    at: At<'_>,
    value: &Json,
    depth: usize,
) -> Result<(), PathError> {
    if depth > MAX_JSON_DEPTH {
        return Err(PathError::TooDeep {
            max: MAX_JSON_DEPTH,
        });
    }
    match value {
        Json::Null => write_scalar(tx, obj, at, ScalarValue::Null)?,
        Json::Bool(b) => write_scalar(tx, obj, at, ScalarValue::Boolean(*b))?,
        Json::Number(n) => write_scalar(tx, obj, at, number_to_scalar(n))?,
        Json::String(s) => write_scalar(tx, obj, at, ScalarValue::Str(s.as_str().into()))?,
        Json::Array(items) => {
            let list = write_object(tx, obj, at, ObjType::List)?;
            for (i, item) in items.iter().enumerate() {
                write_json(tx, &list, At::Insert(i), item, depth + 1)?;
            }
        }
        Json::Object(fields) => {
            let map = write_object(tx, obj, at, ObjType::Map)?;
            for (k, v) in fields {
                write_json(tx, &map, At::Key(k), v, depth + 1)?;
            }
        }
    }
    Ok(())
}

fn number_to_scalar(n: &Number) -> ScalarValue {
    if let Some(i) = n.as_i64() {
        ScalarValue::Int(i)
    } else if let Some(u) = n.as_u64() {
        ScalarValue::Uint(u)
    } else {
        ScalarValue::F64(n.as_f64().unwrap_or(0.0))
    }
}

/// A scalar as JSON.
pub(crate) fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Bytes(b) => Json::String(hex::encode(b)),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}

/// A value (scalar or object `id`) as JSON.
pub(crate) fn value_to_json<R: ReadDoc>(doc: &R, v: Value<'_>, id: &ObjId, depth: usize) -> Json {
    match v {
        Value::Scalar(s) => scalar_to_json(&s),
        Value::Object(t) => obj_to_json(doc, id, t, depth + 1),
    }
}

/// An object as JSON; nesting past [`MAX_JSON_DEPTH`] shows as `null`.
pub(crate) fn obj_to_json<R: ReadDoc>(doc: &R, obj: &ObjId, typ: ObjType, depth: usize) -> Json {
    if depth > MAX_JSON_DEPTH {
        return Json::Null;
    }
    match typ {
        ObjType::Map | ObjType::Table => {
            let mut out = JsonMap::new();
            for key in doc.keys(obj) {
                if let Ok(Some((v, id))) = doc.get(obj, key.as_str()) {
                    out.insert(key, value_to_json(doc, v, &id, depth));
                }
            }
            Json::Object(out)
        }
        ObjType::List => {
            let len = doc.length(obj);
            let items = (0..len)
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, id)| value_to_json(doc, v, &id, depth))
                .collect();
            Json::Array(items)
        }
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::actor::actor_for;
    use crate::kind::DocKind;

    fn doc() -> Document {
        Document::new(DocKind::Generic, &actor_for(&[1; 32], [1; 8]), 1).expect("new")
    }

    #[test]
    fn put_creates_intermediate_maps_and_reads_back() {
        let mut d = doc();
        d.put_json("a.b.c", json!(5), "m", 2).expect("put");
        d.put_json("a.list", json!([1, "two", {"x": true}, null, 1.5]), "m", 2)
            .expect("put");
        d.put_json("a.list.2.y", json!(u64::MAX), "m", 2)
            .expect("nested in list");
        d.put_json("a.list.5", json!("appended"), "m", 2)
            .expect("append at len");
        let j = d.to_json();
        assert_eq!(j["a"]["b"]["c"], 5);
        assert_eq!(
            j["a"]["list"],
            json!([1, "two", {"x": true, "y": u64::MAX}, null, 1.5, "appended"])
        );
        assert_eq!(d.get_json("a.list.1").expect("get"), Some(json!("two")));
        assert_eq!(d.get_json("a.nope.x").expect("get"), None);
        assert_eq!(j["kind"], "generic");
    }

    #[test]
    fn path_errors() {
        let mut d = doc();
        d.put_json("s", json!("scalar"), "m", 2).expect("put");
        d.put_json("l", json!([1]), "m", 2).expect("put");
        assert!(matches!(
            d.put_json("", json!(1), "m", 2),
            Err(PathError::EmptyPath)
        ));
        assert!(matches!(
            d.put_json(".", json!(1), "m", 2),
            Err(PathError::EmptyPath)
        ));
        assert!(matches!(
            d.put_json("a..b", json!(1), "m", 2),
            Err(PathError::BadSegment { .. })
        ));
        assert!(
            matches!(d.put_json("s.x", json!(1), "m", 2), Err(PathError::NotAContainer { path }) if path == "s")
        );
        assert!(matches!(
            d.put_json("l.x", json!(1), "m", 2),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            d.put_json("l.-1", json!(1), "m", 2),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            d.put_json("l.99999999999999999999999", json!(1), "m", 2),
            Err(PathError::BadSegment { .. })
        ));
        assert!(matches!(
            d.put_json("l.5", json!(1), "m", 2),
            Err(PathError::IndexOutOfRange {
                index: 5,
                len: 1,
                ..
            })
        ));
        assert!(matches!(
            d.put_json("l.3.x", json!(1), "m", 2),
            Err(PathError::IndexOutOfRange { .. })
        ));
        assert!(
            matches!(d.put_json("kind", json!("x"), "m", 2), Err(PathError::ReservedField(f)) if f == "kind")
        );
        assert!(matches!(
            d.put_json("schema_version.x", json!(1), "m", 2),
            Err(PathError::ReservedField(_))
        ));
        assert!(matches!(
            d.delete_path("kind", "m", 2),
            Err(PathError::ReservedField(_))
        ));
        // A failed edit leaves no change behind.
        let before = d.heads();
        assert!(d.put_json("s.x.y", json!({"a": 1}), "m", 2).is_err());
        assert_eq!(d.heads(), before);
        // Nesting past the limit.
        let mut deep = json!(1);
        for _ in 0..(MAX_JSON_DEPTH + 2) {
            deep = json!([deep]);
        }
        assert!(matches!(
            d.put_json("deep", deep, "m", 2),
            Err(PathError::TooDeep { .. })
        ));
    }

    #[test]
    fn numeric_keys_in_maps_are_keys() {
        let mut d = doc();
        d.put_json("m.0", json!("zero"), "m", 2).expect("put");
        assert_eq!(d.to_json()["m"], json!({"0": "zero"}));
    }

    #[test]
    fn delete_paths() {
        let mut d = doc();
        d.put_json("a", json!({"b": [1, 2, 3], "c": 1}), "m", 2)
            .expect("put");
        assert!(d.delete_path("a.c", "rm", 3).expect("rm"));
        assert!(!d.delete_path("a.c", "rm", 3).expect("rm again"));
        assert!(d.delete_path("a.b.1", "rm", 3).expect("rm idx"));
        assert!(matches!(
            d.delete_path("a.b.7", "rm", 3),
            Err(PathError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            d.delete_path("x.y", "rm", 3),
            Err(PathError::NotFound { .. })
        ));
        assert_eq!(d.to_json()["a"], json!({"b": [1, 3]}));
    }

    #[test]
    fn string_over_text_updates_text() {
        let mut d = Document::new(DocKind::Memory, &actor_for(&[1; 32], [1; 8]), 1).expect("new");
        d.put_json("text", json!("hello"), "m", 2).expect("put");
        assert_eq!(d.to_json()["text"], "hello");
        // Still a text object, not a scalar.
        let (v, _) = d.automerge().get(ROOT, "text").expect("get").expect("some");
        assert_eq!(v, Value::Object(ObjType::Text));
        assert!(matches!(
            d.put_json("text.x", json!(1), "m", 2),
            Err(PathError::NotAContainer { .. })
        ));
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            (-1e9f64..1e9).prop_map(Json::from),
            "[a-z.é]{0,5}".prop_map(Json::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                proptest::collection::btree_map("[a-z0-9]{0,3}", inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Any path and value: an error or a write that reads back, never a panic.
        #[test]
        fn put_json_any_path_never_panics(path in "[a-z0-9.]{0,10}", value in json_value()) {
            let mut d = Document::new(DocKind::Memory, &actor_for(&[1; 32], [1; 8]), 1)
                .expect("new");
            d.put_json("a", json!({"b": [1, {"c": "x"}], "0": "zero"}), "seed", 1).expect("seed");
            d.put_json("s", json!("scalar"), "seed", 1).expect("seed");
            let before = d.heads();
            match d.put_json(&path, value.clone(), "fuzz", 2) {
                Ok(()) => proptest::prop_assert_eq!(d.get_json(&path).expect("get"), Some(value)),
                Err(_) => proptest::prop_assert_eq!(d.heads(), before),
            }
            let _ = d.get_json(&path);
            let _ = d.delete_path(&path, "fuzz", 3);
            let _ = d.to_json();
        }
    }

    #[test]
    fn scalars_to_json() {
        assert_eq!(
            scalar_to_json(&ScalarValue::Bytes(vec![0xab, 1])),
            json!("ab01")
        );
        assert_eq!(scalar_to_json(&ScalarValue::F64(f64::NAN)), Json::Null);
        assert_eq!(scalar_to_json(&ScalarValue::counter(4)), json!(4));
        assert_eq!(scalar_to_json(&ScalarValue::Timestamp(9)), json!(9));
    }
}
