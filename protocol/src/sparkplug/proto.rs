//! The Sparkplug B payload schema (Eclipse Sparkplug 3.0, chapter 6, `org.eclipse.tahu.protobuf`),
//! written from the specification as prost messages: field names, numbers and types follow
//! the spec, so any conforming edge node's bytes decode here. Extension ranges and the
//! `*Extension` oneof members carry nothing a host can use; prost skips unknown fields.
//!
//! Decoding is bounded: the caller checks the payload size first, and prost refuses nesting
//! deeper than 100 levels (templates and datasets can nest).

#![allow(missing_docs)] // the fields are the specification's; their meaning is documented there

/// The Sparkplug B datatype codes (spec 6.4.16).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
    pub const UUID: u32 = 15;
    pub const DATASET: u32 = 16;
    pub const BYTES: u32 = 17;
    pub const FILE: u32 = 18;
    pub const TEMPLATE: u32 = 19;
    pub const PROPERTY_SET: u32 = 20;
    pub const PROPERTY_SET_LIST: u32 = 21;
    pub const INT8_ARRAY: u32 = 22;
    pub const INT16_ARRAY: u32 = 23;
    pub const INT32_ARRAY: u32 = 24;
    pub const INT64_ARRAY: u32 = 25;
    pub const UINT8_ARRAY: u32 = 26;
    pub const UINT16_ARRAY: u32 = 27;
    pub const UINT32_ARRAY: u32 = 28;
    pub const UINT64_ARRAY: u32 = 29;
    pub const FLOAT_ARRAY: u32 = 30;
    pub const DOUBLE_ARRAY: u32 = 31;
    pub const BOOLEAN_ARRAY: u32 = 32;
    pub const STRING_ARRAY: u32 = 33;
    pub const DATETIME_ARRAY: u32 = 34;
}

/// `Payload`: the body of every Sparkplug B message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "8")]
    pub metadata: Option<MetaData>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18")]
    pub value: Option<MetricValue>,
}

/// `Payload.Metric.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
    #[prost(message, tag = "17")]
    DatasetValue(DataSet),
    #[prost(message, tag = "18")]
    TemplateValue(Template),
}

/// `Payload.MetaData` (multi-part files and descriptions).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetaData {
    #[prost(bool, optional, tag = "1")]
    pub is_multi_part: Option<bool>,
    #[prost(string, optional, tag = "2")]
    pub content_type: Option<String>,
    #[prost(uint64, optional, tag = "3")]
    pub size: Option<u64>,
    #[prost(uint64, optional, tag = "4")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "5")]
    pub file_name: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub file_type: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub md5: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub description: Option<String>,
}

/// `Payload.PropertySet`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// `Payload.PropertyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueValue", tags = "3, 4, 5, 6, 7, 8, 9, 10")]
    pub value: Option<PropertyValueValue>,
}

/// `Payload.PropertyValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueValue {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
    #[prost(message, tag = "9")]
    PropertysetValue(PropertySet),
    #[prost(message, tag = "10")]
    PropertysetsValue(PropertySetList),
}

/// `Payload.PropertySetList`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySetList {
    #[prost(message, repeated, tag = "1")]
    pub propertyset: Vec<PropertySet>,
}

/// `Payload.DataSet`: a table with typed columns.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSet {
    #[prost(uint64, optional, tag = "1")]
    pub num_of_columns: Option<u64>,
    #[prost(string, repeated, tag = "2")]
    pub columns: Vec<String>,
    #[prost(uint32, repeated, packed = "false", tag = "3")]
    pub types: Vec<u32>,
    #[prost(message, repeated, tag = "4")]
    pub rows: Vec<Row>,
}

/// `Payload.DataSet.Row`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    #[prost(message, repeated, tag = "1")]
    pub elements: Vec<DataSetValue>,
}

/// `Payload.DataSet.DataSetValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSetValue {
    #[prost(oneof = "DataSetValueValue", tags = "1, 2, 3, 4, 5, 6")]
    pub value: Option<DataSetValueValue>,
}

/// `Payload.DataSet.DataSetValue.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum DataSetValueValue {
    #[prost(uint32, tag = "1")]
    IntValue(u32),
    #[prost(uint64, tag = "2")]
    LongValue(u64),
    #[prost(float, tag = "3")]
    FloatValue(f32),
    #[prost(double, tag = "4")]
    DoubleValue(f64),
    #[prost(bool, tag = "5")]
    BooleanValue(bool),
    #[prost(string, tag = "6")]
    StringValue(String),
}

/// `Payload.Template`: a user-defined type (definition) or an instance of one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Template {
    #[prost(string, optional, tag = "1")]
    pub version: Option<String>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(message, repeated, tag = "3")]
    pub parameters: Vec<Parameter>,
    #[prost(string, optional, tag = "4")]
    pub template_ref: Option<String>,
    #[prost(bool, optional, tag = "5")]
    pub is_definition: Option<bool>,
}

/// `Payload.Template.Parameter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Parameter {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint32, optional, tag = "2")]
    pub r#type: Option<u32>,
    #[prost(oneof = "ParameterValue", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<ParameterValue>,
}

/// `Payload.Template.Parameter.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterValue {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
}
