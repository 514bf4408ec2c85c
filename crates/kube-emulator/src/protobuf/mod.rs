//! Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`),
//! as kubectl's typed commands (`kubectl create namespace|configmap|deployment …`) send
//! them: the `k8s\0` magic, a `runtime.Unknown` envelope naming apiVersion/kind, and the
//! object's message. Decoded into the JSON the store holds, driven by field tables
//! generated from Kubernetes' own `generated.proto` files (`schema.txt`, see
//! `tools/proto_schema.py`). Responses stay JSON, which kubectl accepts.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};
use crate::util::{base64, format_time};

pub(crate) const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";
const UNKNOWN: &str = "k8s.io.apimachinery.pkg.runtime.Unknown";

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Str,
    Int,
    Bool,
    Bytes,
    Double,
    Float,
    Msg(String),
    Map(Box<Kind>),
}

#[derive(Debug)]
struct Field {
    name: String,
    repeated: bool,
    kind: Kind,
}

type Schema = HashMap<String, HashMap<u64, Field>>;

fn parse_kind(code: &str) -> Option<Kind> {
    Some(match code {
        "s" => Kind::Str,
        "i" => Kind::Int,
        "b" => Kind::Bool,
        "y" => Kind::Bytes,
        "d" => Kind::Double,
        "f" => Kind::Float,
        _ => {
            if let Some(rest) = code.strip_prefix('M') {
                return Some(Kind::Map(Box::new(parse_kind(rest)?)));
            }
            Kind::Msg(code.strip_prefix("m:")?.to_string())
        }
    })
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut schema = Schema::new();
        for line in include_str!("schema.txt").lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            let Some(name) = parts.next() else { continue };
            let mut fields = HashMap::new();
            for part in parts {
                let mut it = part.splitn(3, ':');
                let (Some(num), Some(fname), Some(code)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                let (repeated, code) = match code.strip_prefix('*') {
                    Some(c) => (true, c),
                    None => (false, code),
                };
                if let (Ok(num), Some(kind)) = (num.parse(), parse_kind(code)) {
                    fields.insert(
                        num,
                        Field {
                            name: fname.to_string(),
                            repeated,
                            kind,
                        },
                    );
                }
            }
            schema.insert(name.to_string(), fields);
        }
        schema
    })
}

/// One wire value.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn malformed() -> ApiError {
    ApiError::bad_request("invalid protobuf body")
}

fn varint(buf: &[u8], pos: &mut usize) -> ApiResult<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or_else(malformed)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed())
}

/// Splits a message into (field number, value) pairs.
fn fields(buf: &[u8]) -> ApiResult<Vec<(u64, Wire<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let take = |pos: &mut usize, n: usize| -> ApiResult<&[u8]> {
            let end = pos
                .checked_add(n)
                .filter(|e| *e <= buf.len())
                .ok_or_else(malformed)?;
            let slice = &buf[*pos..end];
            *pos = end;
            Ok(slice)
        };
        let value = match tag & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            1 => {
                let b = take(&mut pos, 8)?;
                Wire::Fixed64(u64::from_le_bytes(b.try_into().map_err(|_| malformed())?))
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| malformed())?;
                Wire::Bytes(take(&mut pos, len)?)
            }
            5 => {
                let b = take(&mut pos, 4)?;
                Wire::Fixed32(u32::from_le_bytes(b.try_into().map_err(|_| malformed())?))
            }
            _ => return Err(malformed()),
        };
        out.push((tag >> 3, value));
    }
    Ok(out)
}

/// The proto package of an apiVersion, for the kinds the schema covers.
fn package_of(api_version: &str) -> Option<&'static str> {
    Some(match api_version {
        "v1" => "k8s.io.api.core.v1",
        "apps/v1" => "k8s.io.api.apps.v1",
        "batch/v1" => "k8s.io.api.batch.v1",
        "rbac.authorization.k8s.io/v1" => "k8s.io.api.rbac.v1",
        "policy/v1" => "k8s.io.api.policy.v1",
        _ => return None,
    })
}

/// Decodes a protobuf request body into the JSON object it encodes.
pub(crate) fn decode_object(body: &[u8]) -> ApiResult<Value> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body without the k8s magic prefix"))?;
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    for (num, value) in fields(envelope)? {
        match (num, value) {
            (1, Wire::Bytes(type_meta)) => {
                for (n, v) in fields(type_meta)? {
                    if let Wire::Bytes(s) = v {
                        let s = String::from_utf8_lossy(s).into_owned();
                        match n {
                            1 => api_version = s,
                            2 => kind = s,
                            _ => {}
                        }
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            (3, Wire::Bytes(b)) => encoding = String::from_utf8_lossy(b).into_owned(),
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(ApiError::unsupported_media_type(&format!(
            "{CONTENT_TYPE} with contentEncoding {encoding}"
        )));
    }
    let message = package_of(&api_version)
        .map(|p| format!("{p}.{kind}"))
        .filter(|m| schema().contains_key(m) && m != UNKNOWN)
        .ok_or_else(|| {
            ApiError::unsupported_media_type(&format!(
                "{CONTENT_TYPE} for {api_version} {kind} (protobuf bodies are decoded for core/v1 \
                 Namespace, ConfigMap, Secret, Service, ServiceAccount, Pod; apps/v1 Deployment, \
                 ReplicaSet, StatefulSet; batch/v1 Job, CronJob; rbac/v1 roles and bindings; \
                 policy/v1 PodDisruptionBudget)"
            ))
        })?;
    let mut object = decode_message(&message, raw, 0)?;
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), json!(api_version));
        map.insert("kind".into(), json!(kind));
    }
    Ok(object)
}

/// Fields whose zero value is meaningful (Go pointers); other zero scalars are dropped,
/// as Go's `omitempty` JSON encoding of the decoded object would.
const KEEP_ZERO: &[&str] = &[
    "replicas",
    "partition",
    "minReadySeconds",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "backoffLimit",
    "completions",
    "parallelism",
    "ttlSecondsAfterFinished",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "defaultMode",
    "mode",
    "automountServiceAccountToken",
    "immutable",
    "suspend",
    "paused",
];

fn decode_message(name: &str, buf: &[u8], depth: usize) -> ApiResult<Value> {
    if depth > 64 {
        return Err(ApiError::bad_request("protobuf body nested too deeply"));
    }
    let special = special(name, buf)?;
    if let Some(v) = special {
        return Ok(v);
    }
    let table = schema()
        .get(name)
        .ok_or_else(|| ApiError::internal(format!("no protobuf schema for {name}")))?;
    let mut out = Map::new();
    for (num, wire) in fields(buf)? {
        // Unknown fields are skipped, as the API server's decoder does.
        let Some(field) = table.get(&num) else {
            continue;
        };
        match &field.kind {
            Kind::Map(value_kind) => {
                let Wire::Bytes(entry) = wire else {
                    return Err(malformed());
                };
                let (mut key, mut value) = (String::new(), None);
                for (n, w) in fields(entry)? {
                    match n {
                        1 => {
                            key = scalar(&Kind::Str, w, depth)?
                                .as_str()
                                .unwrap_or("")
                                .to_string();
                        }
                        2 => value = Some(scalar(value_kind, w, depth)?),
                        _ => {}
                    }
                }
                let default = match value_kind.as_ref() {
                    Kind::Str | Kind::Bytes => json!(""),
                    _ => json!({}),
                };
                let map = out.entry(field.name.clone()).or_insert_with(|| json!({}));
                if let Some(m) = map.as_object_mut() {
                    m.insert(key, value.unwrap_or(default));
                }
            }
            kind if field.repeated => {
                let items = out.entry(field.name.clone()).or_insert_with(|| json!([]));
                let Some(items) = items.as_array_mut() else {
                    continue;
                };
                match (kind, wire) {
                    // Packed repeated scalars.
                    (Kind::Int | Kind::Bool, Wire::Bytes(packed)) => {
                        let mut pos = 0;
                        while pos < packed.len() {
                            let v = varint(packed, &mut pos)?;
                            items.push(scalar(kind, Wire::Varint(v), depth)?);
                        }
                    }
                    _ => items.push(scalar(kind, wire, depth)?),
                }
            }
            kind => {
                let value = scalar(kind, wire, depth)?;
                let zero = match &value {
                    Value::Null => true,
                    Value::String(s) => s.is_empty() && *kind == Kind::Str,
                    Value::Bool(b) => !b,
                    Value::Number(n) => n.as_f64() == Some(0.0),
                    _ => false,
                };
                if zero && (value.is_null() || !KEEP_ZERO.contains(&field.name.as_str())) {
                    out.remove(&field.name);
                } else {
                    out.insert(field.name.clone(), value);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

fn scalar(kind: &Kind, wire: Wire<'_>, depth: usize) -> ApiResult<Value> {
    Ok(match (kind, wire) {
        (Kind::Str, Wire::Bytes(b)) => json!(
            std::str::from_utf8(b)
                .map_err(|_| ApiError::bad_request("invalid UTF-8 in protobuf string"))?
        ),
        (Kind::Bytes, Wire::Bytes(b)) => json!(base64(b)),
        (Kind::Int, Wire::Varint(v)) => json!(v as i64),
        (Kind::Bool, Wire::Varint(v)) => json!(v != 0),
        (Kind::Double, Wire::Fixed64(v)) => json!(f64::from_bits(v)),
        (Kind::Float, Wire::Fixed32(v)) => json!(f32::from_bits(v)),
        (Kind::Msg(name), Wire::Bytes(b)) => decode_message(name, b, depth + 1)?,
        _ => return Err(malformed()),
    })
}

/// Messages with a JSON form of their own; `None` for ordinary messages.
fn special(name: &str, buf: &[u8]) -> ApiResult<Option<Value>> {
    let short = name.rsplit('.').next().unwrap_or("");
    let is = |pkg: &str| name.starts_with(pkg);
    let known = match short {
        "Time" | "MicroTime" | "Duration" | "FieldsV1" => {
            is("k8s.io.apimachinery.pkg.apis.meta.v1.")
        }
        "IntOrString" => is("k8s.io.apimachinery.pkg.util.intstr."),
        "Quantity" => is("k8s.io.apimachinery.pkg.api.resource."),
        "RawExtension" => is("k8s.io.apimachinery.pkg.runtime."),
        _ => false,
    };
    if !known {
        return Ok(None);
    }
    let mut ints: HashMap<u64, i64> = HashMap::new();
    let mut bytes: HashMap<u64, &[u8]> = HashMap::new();
    for (num, wire) in fields(buf)? {
        match wire {
            Wire::Varint(v) => {
                ints.insert(num, v as i64);
            }
            Wire::Bytes(b) => {
                bytes.insert(num, b);
            }
            _ => {}
        }
    }
    let text = |n: u64| String::from_utf8_lossy(bytes.get(&n).copied().unwrap_or(&[])).into_owned();
    Ok(Some(match short {
        "Time" | "MicroTime" => {
            let (secs, nanos) = (
                ints.get(&1).copied().unwrap_or(0),
                ints.get(&2).copied().unwrap_or(0),
            );
            if secs == 0 && nanos == 0 {
                Value::Null
            } else {
                let t = std::time::UNIX_EPOCH
                    + std::time::Duration::new(
                        u64::try_from(secs).unwrap_or(0),
                        u32::try_from(nanos).unwrap_or(0),
                    );
                json!(format_time(t, short == "MicroTime"))
            }
        }
        "Duration" => {
            let nanos = ints.get(&1).copied().unwrap_or(0);
            json!(format!("{}s", nanos as f64 / 1e9))
        }
        "IntOrString" => match ints.get(&1).copied().unwrap_or(0) {
            1 => json!(text(3)),
            _ => json!(ints.get(&2).copied().unwrap_or(0)),
        },
        "Quantity" => json!(text(1)),
        _ => {
            // RawExtension, FieldsV1: embedded JSON.
            let raw = bytes.get(&1).copied().unwrap_or(&[]);
            serde_json::from_slice(raw).unwrap_or(Value::Null)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(num: u64, wire: u64, out: &mut Vec<u8>) {
        put_varint((num << 3) | wire, out);
    }

    fn put_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(num: u64, b: &[u8], out: &mut Vec<u8>) {
        tag(num, 2, out);
        put_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut type_meta = Vec::new();
        bytes_field(1, api_version.as_bytes(), &mut type_meta);
        bytes_field(2, kind.as_bytes(), &mut type_meta);
        let mut unknown = Vec::new();
        bytes_field(1, &type_meta, &mut unknown);
        bytes_field(2, raw, &mut unknown);
        bytes_field(3, b"", &mut unknown);
        bytes_field(4, b"", &mut unknown);
        let mut body = MAGIC.to_vec();
        body.extend(unknown);
        body
    }

    #[test]
    fn decodes_a_configmap_like_kubectl_sends_it() {
        // metadata {name: "cfg", namespace: "", creationTimestamp: {}}, data {a: "1"},
        // binaryData {b: [0xff]}
        let mut meta = Vec::new();
        bytes_field(1, b"cfg", &mut meta);
        bytes_field(3, b"", &mut meta);
        tag(7, 0, &mut meta);
        put_varint(0, &mut meta);
        bytes_field(8, b"", &mut meta);
        let mut entry = Vec::new();
        bytes_field(1, b"a", &mut entry);
        bytes_field(2, b"1", &mut entry);
        let mut bin = Vec::new();
        bytes_field(1, b"b", &mut bin);
        bytes_field(2, &[0xff], &mut bin);
        let mut cm = Vec::new();
        bytes_field(1, &meta, &mut cm);
        bytes_field(2, &entry, &mut cm);
        bytes_field(3, &bin, &mut cm);
        let obj = decode_object(&envelope("v1", "ConfigMap", &cm)).expect("decodes");
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                   "data": {"a": "1"}, "binaryData": {"b": "/w=="}})
        );
    }

    #[test]
    fn int_or_string_and_pointers_keep_their_values() {
        // Deployment spec {replicas: 0, strategy {rollingUpdate {maxSurge: "25%"}}}
        let mut surge = Vec::new();
        tag(1, 0, &mut surge);
        put_varint(1, &mut surge);
        bytes_field(3, b"25%", &mut surge);
        let mut rolling = Vec::new();
        bytes_field(2, &surge, &mut rolling);
        let mut strategy = Vec::new();
        bytes_field(2, &rolling, &mut strategy);
        let mut spec = Vec::new();
        tag(1, 0, &mut spec);
        put_varint(0, &mut spec);
        bytes_field(4, &strategy, &mut spec);
        let mut d = Vec::new();
        bytes_field(2, &spec, &mut d);
        let obj = decode_object(&envelope("apps/v1", "Deployment", &d)).expect("decodes");
        assert_eq!(obj["spec"]["replicas"], json!(0));
        assert_eq!(
            obj["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
            json!("25%")
        );
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        assert_eq!(decode_object(b"{}").map_err(|e| e.code).err(), Some(400));
        let err = decode_object(&envelope("example.com/v1", "Widget", &[])).expect_err("415");
        assert_eq!(err.code, 415);
        let mut truncated = envelope("v1", "ConfigMap", &[]);
        truncated.push(0x0a);
        truncated.push(0x05);
        assert_eq!(
            decode_object(&truncated).map_err(|e| e.code).err(),
            Some(400)
        );
    }

    #[test]
    fn schema_covers_the_generated_kinds() {
        for kind in [
            "k8s.io.api.core.v1.Namespace",
            "k8s.io.api.core.v1.Secret",
            "k8s.io.api.core.v1.Service",
            "k8s.io.api.apps.v1.Deployment",
            "k8s.io.api.batch.v1.Job",
            "k8s.io.api.rbac.v1.RoleBinding",
            "k8s.io.api.policy.v1.PodDisruptionBudget",
        ] {
            assert!(schema().contains_key(kind), "{kind}");
        }
    }
}
