//! Sparkplug B metric values <-> JSON, both ways.
//!
//! | Sparkplug | JSON |
//! |---|---|
//! | Int8..Int64, UInt8..UInt64 | integer (signed types read from their two's complement) |
//! | Float, Double | number; NaN and infinities, which JSON cannot hold, become `null` |
//! | Boolean | `true` / `false` |
//! | String, Text, UUID | string |
//! | DateTime | integer, milliseconds since the Unix epoch (exactly Sparkplug's value) |
//! | numeric, boolean, string and DateTime arrays | array |
//! | DataSet | `{"columns": [..], "types": [..], "rows": [[..], ..]}` |
//! | Template instance | object of its member metrics, by name |
//! | `is_null` | `null` (which removes the key from the reported state) |
//! | Bytes, File, PropertySet(List), template definitions | not mapped ([`Unmapped`]) |

use serde_json::{Map, Number, Value};

use super::proto::{DataSet, DataSetValueValue, Metric, MetricValue, Template, datatype as dt};

/// Why a metric's value has no JSON form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmapped {
    /// Bytes, files and property sets are not state an operator reads in a Device.
    #[error("datatype {0} is not mapped to JSON")]
    Datatype(u32),
    /// The value does not match the metric's datatype.
    #[error("value does not match datatype {0}")]
    Mismatch(u32),
    /// A template definition (in a birth) describes a type, not a value.
    #[error("template definitions carry no value")]
    Definition,
}

/// The JSON form of a metric's value, read as `datatype` (the metric's own, or the one its
/// birth declared when a data message leaves it out).
///
/// # Errors
/// [`Unmapped`] when the datatype has no JSON form or the value does not fit it.
pub fn to_json(metric: &Metric, datatype: u32) -> Result<Value, Unmapped> {
    if metric.is_null == Some(true) {
        return Ok(Value::Null);
    }
    let Some(value) = &metric.value else {
        return Ok(Value::Null);
    };
    let mismatch = || Unmapped::Mismatch(datatype);
    Ok(match (datatype, value) {
        (dt::INT8, MetricValue::IntValue(v)) => (*v as u8 as i8).into(),
        (dt::INT16, MetricValue::IntValue(v)) => (*v as u16 as i16).into(),
        (dt::INT32, MetricValue::IntValue(v)) => (*v as i32).into(),
        // Some encoders put small signed types in the 64-bit field.
        (dt::INT8 | dt::INT16 | dt::INT32 | dt::INT64, MetricValue::LongValue(v)) => {
            (*v as i64).into()
        }
        (dt::UINT8 | dt::UINT16 | dt::UINT32, MetricValue::IntValue(v)) => (*v).into(),
        (
            dt::UINT8 | dt::UINT16 | dt::UINT32 | dt::UINT64 | dt::DATETIME,
            MetricValue::LongValue(v),
        ) => (*v).into(),
        (dt::FLOAT, MetricValue::FloatValue(v)) => float(f64::from(*v)),
        (dt::DOUBLE | dt::FLOAT, MetricValue::DoubleValue(v)) => float(*v),
        (dt::BOOLEAN, MetricValue::BooleanValue(v)) => (*v).into(),
        (dt::STRING | dt::TEXT | dt::UUID, MetricValue::StringValue(s)) => s.clone().into(),
        (dt::DATASET, MetricValue::DatasetValue(d)) => dataset(d),
        (dt::TEMPLATE, MetricValue::TemplateValue(t)) => template(t)?,
        (dt::INT8_ARRAY..=dt::DATETIME_ARRAY, MetricValue::BytesValue(b)) => {
            array(datatype, b).ok_or_else(mismatch)?
        }
        (dt::BYTES | dt::FILE | dt::PROPERTY_SET | dt::PROPERTY_SET_LIST, _) => {
            return Err(Unmapped::Datatype(datatype));
        }
        _ => return Err(mismatch()),
    })
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn dataset(d: &DataSet) -> Value {
    let rows = d
        .rows
        .iter()
        .map(|row| {
            Value::Array(
                row.elements
                    .iter()
                    .map(|e| match &e.value {
                        None => Value::Null,
                        Some(DataSetValueValue::IntValue(v)) => (*v).into(),
                        Some(DataSetValueValue::LongValue(v)) => (*v).into(),
                        Some(DataSetValueValue::FloatValue(v)) => float(f64::from(*v)),
                        Some(DataSetValueValue::DoubleValue(v)) => float(*v),
                        Some(DataSetValueValue::BooleanValue(v)) => (*v).into(),
                        Some(DataSetValueValue::StringValue(s)) => s.clone().into(),
                    })
                    .collect(),
            )
        })
        .collect();
    let mut out = Map::new();
    out.insert("columns".into(), d.columns.clone().into());
    out.insert("types".into(), d.types.clone().into());
    out.insert("rows".into(), Value::Array(rows));
    Value::Object(out)
}

fn template(t: &Template) -> Result<Value, Unmapped> {
    if t.is_definition == Some(true) {
        return Err(Unmapped::Definition);
    }
    let mut out = Map::new();
    for m in &t.metrics {
        // Members are named (templates have no aliases); unmappable members are left out.
        if let (Some(name), Some(datatype)) = (&m.name, m.datatype)
            && let Ok(v) = to_json(m, datatype)
        {
            out.insert(name.clone(), v);
        }
    }
    Ok(Value::Object(out))
}

/// Sparkplug 3.0 arrays: little-endian packed elements in `bytes_value`; booleans as a 4-byte
/// count then bits, most significant first; strings NUL-terminated.
fn array(datatype: u32, b: &[u8]) -> Option<Value> {
    fn chunks<const N: usize, T: Into<Value>>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Option<Value> {
        if !b.len().is_multiple_of(N) {
            return None;
        }
        Some(Value::Array(
            b.chunks_exact(N)
                .map(|c| f(c.try_into().expect("exact chunk")).into())
                .collect(),
        ))
    }
    match datatype {
        dt::INT8_ARRAY => chunks(b, i8::from_le_bytes),
        dt::INT16_ARRAY => chunks(b, i16::from_le_bytes),
        dt::INT32_ARRAY => chunks(b, i32::from_le_bytes),
        dt::INT64_ARRAY => chunks(b, i64::from_le_bytes),
        dt::UINT8_ARRAY => chunks(b, u8::from_le_bytes),
        dt::UINT16_ARRAY => chunks(b, u16::from_le_bytes),
        dt::UINT32_ARRAY => chunks(b, u32::from_le_bytes),
        dt::UINT64_ARRAY | dt::DATETIME_ARRAY => chunks(b, u64::from_le_bytes),
        dt::FLOAT_ARRAY => chunks(b, |c| float(f64::from(f32::from_le_bytes(c)))),
        dt::DOUBLE_ARRAY => chunks(b, |c| float(f64::from_le_bytes(c))),
        dt::BOOLEAN_ARRAY => {
            let (count, bits) = b.split_first_chunk::<4>()?;
            let count = u32::from_le_bytes(*count) as usize;
            if count > bits.len() * 8 {
                return None;
            }
            Some(Value::Array(
                (0..count)
                    .map(|i| Value::Bool(bits[i / 8] & (0x80 >> (i % 8)) != 0))
                    .collect(),
            ))
        }
        dt::STRING_ARRAY => {
            let body = b.strip_suffix(&[0])?;
            body.split(|&c| c == 0)
                .map(|s| {
                    std::str::from_utf8(s)
                        .ok()
                        .map(|s| Value::String(s.to_owned()))
                })
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        }
        _ => None,
    }
}

/// A metric value for a command (NCMD/DCMD) from a desired JSON value, for a metric the
/// birth declared with `datatype`. `None` when the value does not fit: commands are sent for
/// scalar metrics only, and a value out of range is never truncated.
pub fn from_json(value: &Value, datatype: u32) -> Option<MetricValue> {
    Some(match datatype {
        dt::INT8 => MetricValue::IntValue(i8::try_from(value.as_i64()?).ok()? as u8 as u32),
        dt::INT16 => MetricValue::IntValue(i16::try_from(value.as_i64()?).ok()? as u16 as u32),
        dt::INT32 => MetricValue::IntValue(i32::try_from(value.as_i64()?).ok()? as u32),
        dt::INT64 => MetricValue::LongValue(value.as_i64()? as u64),
        dt::UINT8 => MetricValue::IntValue(u8::try_from(value.as_u64()?).ok()?.into()),
        dt::UINT16 => MetricValue::IntValue(u16::try_from(value.as_u64()?).ok()?.into()),
        dt::UINT32 => MetricValue::IntValue(u32::try_from(value.as_u64()?).ok()?),
        dt::UINT64 | dt::DATETIME => MetricValue::LongValue(value.as_u64()?),
        // An f64 written to a Float metric rounds to the nearest f32, as the device would.
        #[allow(clippy::cast_possible_truncation)]
        dt::FLOAT => MetricValue::FloatValue(value.as_f64()? as f32),
        dt::DOUBLE => MetricValue::DoubleValue(value.as_f64()?),
        dt::BOOLEAN => MetricValue::BooleanValue(value.as_bool()?),
        dt::STRING | dt::TEXT | dt::UUID => MetricValue::StringValue(value.as_str()?.to_owned()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metric(datatype: u32, value: MetricValue) -> Metric {
        Metric {
            datatype: Some(datatype),
            value: Some(value),
            ..Metric::default()
        }
    }

    #[test]
    fn scalars_map_faithfully_both_ways() {
        let cases = [
            (
                dt::INT8,
                MetricValue::IntValue((-5i8) as u8 as u32),
                json!(-5),
            ),
            (
                dt::INT16,
                MetricValue::IntValue((-300i16) as u16 as u32),
                json!(-300),
            ),
            (
                dt::INT32,
                MetricValue::IntValue((-70000i32) as u32),
                json!(-70000),
            ),
            (dt::INT64, MetricValue::LongValue((-1i64) as u64), json!(-1)),
            (dt::UINT8, MetricValue::IntValue(255), json!(255)),
            (dt::UINT32, MetricValue::IntValue(u32::MAX), json!(u32::MAX)),
            (
                dt::UINT64,
                MetricValue::LongValue(u64::MAX),
                json!(u64::MAX),
            ),
            (dt::DOUBLE, MetricValue::DoubleValue(21.5), json!(21.5)),
            (dt::FLOAT, MetricValue::FloatValue(0.5), json!(0.5)),
            (dt::BOOLEAN, MetricValue::BooleanValue(true), json!(true)),
            (
                dt::STRING,
                MetricValue::StringValue("run".into()),
                json!("run"),
            ),
            (
                dt::DATETIME,
                MetricValue::LongValue(1_764_633_600_123),
                json!(1_764_633_600_123u64),
            ),
        ];
        for (datatype, value, expected) in cases {
            let m = metric(datatype, value.clone());
            assert_eq!(to_json(&m, datatype), Ok(expected.clone()), "{datatype}");
            assert_eq!(from_json(&expected, datatype), Some(value), "{datatype}");
        }
    }

    #[test]
    fn out_of_range_commands_are_refused_not_truncated() {
        assert_eq!(from_json(&json!(128), dt::INT8), None);
        assert_eq!(from_json(&json!(-1), dt::UINT16), None);
        assert_eq!(from_json(&json!("1"), dt::INT32), None);
        assert_eq!(from_json(&json!(1.5), dt::INT64), None);
        assert_eq!(from_json(&json!(1), dt::BOOLEAN), None);
        assert_eq!(from_json(&json!([1]), dt::INT8_ARRAY), None);
    }

    #[test]
    fn nulls_nans_and_mismatches() {
        let mut m = metric(dt::DOUBLE, MetricValue::DoubleValue(f64::NAN));
        assert_eq!(to_json(&m, dt::DOUBLE), Ok(Value::Null));
        m.is_null = Some(true);
        m.value = None;
        assert_eq!(to_json(&m, dt::DOUBLE), Ok(Value::Null));
        let m = metric(dt::BOOLEAN, MetricValue::StringValue("x".into()));
        assert_eq!(
            to_json(&m, dt::BOOLEAN),
            Err(Unmapped::Mismatch(dt::BOOLEAN))
        );
        let m = metric(dt::BYTES, MetricValue::BytesValue(vec![1]));
        assert_eq!(to_json(&m, dt::BYTES), Err(Unmapped::Datatype(dt::BYTES)));
    }

    #[test]
    fn arrays_decode_from_packed_bytes() {
        let m = metric(
            dt::INT16_ARRAY,
            MetricValue::BytesValue(vec![0xff, 0xff, 2, 0]),
        );
        assert_eq!(to_json(&m, dt::INT16_ARRAY), Ok(json!([-1, 2])));
        let m = metric(
            dt::BOOLEAN_ARRAY,
            MetricValue::BytesValue(vec![3, 0, 0, 0, 0b1010_0000]),
        );
        assert_eq!(
            to_json(&m, dt::BOOLEAN_ARRAY),
            Ok(json!([true, false, true]))
        );
        let m = metric(
            dt::STRING_ARRAY,
            MetricValue::BytesValue(b"ab\0c\0".to_vec()),
        );
        assert_eq!(to_json(&m, dt::STRING_ARRAY), Ok(json!(["ab", "c"])));
        let m = metric(dt::INT32_ARRAY, MetricValue::BytesValue(vec![1, 2, 3]));
        assert!(to_json(&m, dt::INT32_ARRAY).is_err(), "ragged array");
        let m = metric(
            dt::BOOLEAN_ARRAY,
            MetricValue::BytesValue(vec![9, 0, 0, 0, 0]),
        );
        assert!(
            to_json(&m, dt::BOOLEAN_ARRAY).is_err(),
            "count beyond the bits"
        );
    }

    #[test]
    fn datasets_and_template_instances() {
        use super::super::proto::{DataSetValue, Row};
        let d = DataSet {
            num_of_columns: Some(2),
            columns: vec!["a".into(), "b".into()],
            types: vec![dt::INT32, dt::STRING],
            rows: vec![Row {
                elements: vec![
                    DataSetValue {
                        value: Some(DataSetValueValue::IntValue(1)),
                    },
                    DataSetValue {
                        value: Some(DataSetValueValue::StringValue("x".into())),
                    },
                ],
            }],
        };
        let m = metric(dt::DATASET, MetricValue::DatasetValue(d));
        assert_eq!(
            to_json(&m, dt::DATASET),
            Ok(json!({"columns": ["a", "b"], "types": [3, 12], "rows": [[1, "x"]]}))
        );
        let member = Metric {
            name: Some("speed".into()),
            ..metric(dt::DOUBLE, MetricValue::DoubleValue(2.0))
        };
        let mut t = Template {
            metrics: vec![member],
            ..Template::default()
        };
        let m = metric(dt::TEMPLATE, MetricValue::TemplateValue(t.clone()));
        assert_eq!(to_json(&m, dt::TEMPLATE), Ok(json!({"speed": 2.0})));
        t.is_definition = Some(true);
        let m = metric(dt::TEMPLATE, MetricValue::TemplateValue(t));
        assert_eq!(to_json(&m, dt::TEMPLATE), Err(Unmapped::Definition));
    }
}
