//! A minimal ONNX protobuf *encoder*: just the messages and fields our exported graphs use.
//!
//! Writing the wire format by hand keeps the build free of protoc and codegen crates. Field
//! numbers follow `onnx.proto` (IR version 8, default-domain opset 17).

use std::path::Path;

pub const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;

/// `TensorProto.DataType` values we emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Float = 1,
    Uint8 = 2,
    Int64 = 7,
    Float16 = 10,
}

/// The domain of ONNX Runtime's contrib operators (`MatMulNBits`).
pub const MS_DOMAIN: &str = "com.microsoft";

// ---- wire format ----------------------------------------------------------------------------

const VARINT: u32 = 0;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(buf, u64::from((field << 3) | wire));
}

/// int64 fields are plain varints; negatives take ten bytes (two's complement).
fn put_int(buf: &mut Vec<u8>, field: u32, v: i64) {
    put_key(buf, field, VARINT);
    put_varint(buf, v as u64);
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn put_str(buf: &mut Vec<u8>, field: u32, s: &str) {
    put_bytes(buf, field, s.as_bytes());
}

fn put_msg(buf: &mut Vec<u8>, field: u32, encode: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    encode(&mut inner);
    put_bytes(buf, field, &inner);
}

fn put_packed_ints(buf: &mut Vec<u8>, field: u32, values: &[i64]) {
    let mut inner = Vec::new();
    for &v in values {
        put_varint(&mut inner, v as u64);
    }
    put_bytes(buf, field, &inner);
}

// ---- messages -------------------------------------------------------------------------------

/// `TensorProto` with its payload in `raw_data` (little endian).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorProto {
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: DataType,
    pub raw_data: Vec<u8>,
}

impl TensorProto {
    pub fn f32(name: impl Into<String>, dims: &[i64], data: &[f32]) -> Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "tensor dims do not match data length");
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn i64(name: impl Into<String>, dims: &[i64], data: &[i64]) -> Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "tensor dims do not match data length");
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Int64,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A tensor of any type from its little-endian bytes.
    pub fn raw(name: impl Into<String>, dims: &[i64], data_type: DataType, raw_data: Vec<u8>) -> Self {
        Self { name: name.into(), dims: dims.to_vec(), data_type, raw_data }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        if !self.dims.is_empty() {
            put_packed_ints(buf, 1, &self.dims);
        }
        put_int(buf, 2, self.data_type as i64);
        put_str(buf, 8, &self.name);
        put_bytes(buf, 9, &self.raw_data);
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    Ints(Vec<i64>),
    String(String),
    Tensor(TensorProto),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
}

impl Attribute {
    pub fn float(name: &str, v: f32) -> Self {
        Self { name: name.into(), value: AttrValue::Float(v) }
    }
    pub fn int(name: &str, v: i64) -> Self {
        Self { name: name.into(), value: AttrValue::Int(v) }
    }
    pub fn ints(name: &str, v: &[i64]) -> Self {
        Self { name: name.into(), value: AttrValue::Ints(v.to_vec()) }
    }
    pub fn string(name: &str, v: &str) -> Self {
        Self { name: name.into(), value: AttrValue::String(v.into()) }
    }
    pub fn tensor(name: &str, t: TensorProto) -> Self {
        Self { name: name.into(), value: AttrValue::Tensor(t) }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        put_str(buf, 1, &self.name);
        let ty = match &self.value {
            AttrValue::Float(f) => {
                put_key(buf, 2, FIXED32);
                buf.extend_from_slice(&f.to_le_bytes());
                1
            }
            AttrValue::Int(i) => {
                put_int(buf, 3, *i);
                2
            }
            AttrValue::String(s) => {
                put_str(buf, 4, s);
                3
            }
            AttrValue::Tensor(t) => {
                put_msg(buf, 5, |b| t.encode(b));
                4
            }
            AttrValue::Ints(v) => {
                put_packed_ints(buf, 8, v);
                7
            }
        };
        put_int(buf, 20, ty);
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeProto {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
}

impl NodeProto {
    fn encode(&self, buf: &mut Vec<u8>) {
        for i in &self.inputs {
            put_str(buf, 1, i);
        }
        for o in &self.outputs {
            put_str(buf, 2, o);
        }
        put_str(buf, 3, &self.name);
        put_str(buf, 4, &self.op_type);
        for a in &self.attributes {
            put_msg(buf, 5, |b| a.encode(b));
        }
        if !self.domain.is_empty() {
            put_str(buf, 7, &self.domain);
        }
    }
}

/// One tensor dimension: a fixed size or a symbolic name shared across inputs/outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Value(i64),
    Param(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Value(v)
    }
}
impl From<usize> for Dim {
    fn from(v: usize) -> Self {
        Dim::Value(v as i64)
    }
}
impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Param(v.into())
    }
}

/// `ValueInfoProto` for a tensor graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: DataType,
    pub dims: Vec<Dim>,
}

impl ValueInfo {
    fn encode(&self, buf: &mut Vec<u8>) {
        put_str(buf, 1, &self.name);
        // TypeProto { tensor_type: TypeProto.Tensor { elem_type, shape: TensorShapeProto { dim* } } }
        put_msg(buf, 2, |ty| {
            put_msg(ty, 1, |tt| {
                put_int(tt, 1, self.elem_type as i64);
                put_msg(tt, 2, |shape| {
                    for d in &self.dims {
                        put_msg(shape, 1, |dim| match d {
                            Dim::Value(v) => put_int(dim, 1, *v),
                            Dim::Param(p) => put_str(dim, 2, p),
                        });
                    }
                });
            });
        });
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GraphProto {
    pub name: String,
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

impl GraphProto {
    fn encode(&self, buf: &mut Vec<u8>) {
        for n in &self.nodes {
            put_msg(buf, 1, |b| n.encode(b));
        }
        put_str(buf, 2, &self.name);
        for t in &self.initializers {
            put_msg(buf, 5, |b| t.encode(b));
        }
        for i in &self.inputs {
            put_msg(buf, 11, |b| i.encode(b));
        }
        for o in &self.outputs {
            put_msg(buf, 12, |b| o.encode(b));
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelProto {
    pub ir_version: i64,
    pub producer_name: String,
    pub producer_version: String,
    /// `(domain, version)` pairs; `""` is the default ONNX domain.
    pub opset_import: Vec<(String, i64)>,
    pub graph: GraphProto,
}

impl ModelProto {
    pub fn new(graph: GraphProto) -> Self {
        Self {
            ir_version: IR_VERSION,
            producer_name: "prefstream".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            opset_import: vec![(String::new(), OPSET)],
            graph,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        put_int(&mut buf, 1, self.ir_version);
        put_str(&mut buf, 2, &self.producer_name);
        put_str(&mut buf, 3, &self.producer_version);
        put_msg(&mut buf, 7, |b| self.graph.encode(b));
        for (domain, version) in &self.opset_import {
            put_msg(&mut buf, 8, |b| {
                put_str(b, 1, domain);
                put_int(b, 2, *version);
            });
        }
        buf
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.encode())
    }
}

// ---- builder --------------------------------------------------------------------------------

/// Accumulates a graph; every node gets a unique name and auto-named outputs, so graph code
/// only threads value names through.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    next_id: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self { graph: GraphProto { name: name.into(), ..Default::default() }, next_id: 0 }
    }

    fn fresh(&mut self, stem: &str) -> String {
        self.next_id += 1;
        format!("{stem}_{}", self.next_id)
    }

    pub fn input(&mut self, name: &str, elem_type: DataType, dims: Vec<Dim>) -> String {
        self.graph.inputs.push(ValueInfo { name: name.into(), elem_type, dims });
        name.into()
    }

    /// Declares `name` (already produced by some node) as a graph output.
    pub fn output(&mut self, name: &str, elem_type: DataType, dims: Vec<Dim>) {
        self.graph.outputs.push(ValueInfo { name: name.into(), elem_type, dims });
    }

    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        self.graph.initializers.push(TensorProto::f32(name, dims, data));
        name.into()
    }

    /// An fp16 initializer from f32 values (rounded to nearest).
    pub fn init_f16(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "tensor dims do not match data length");
        let raw = data.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
        self.init_raw(TensorProto::raw(name, dims, DataType::Float16, raw))
    }

    pub fn init_raw(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        self.graph.initializers.push(t);
        name
    }

    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        self.graph.initializers.push(TensorProto::i64(name, dims, data));
        name.into()
    }

    /// Anonymous 1-D int64 constant (shapes, axes, perms).
    pub fn const_i64(&mut self, data: &[i64]) -> String {
        let name = self.fresh("const");
        self.init_i64(&name, &[data.len() as i64], data)
    }

    /// Anonymous float scalar constant (rank 0, broadcasts anywhere).
    pub fn scalar_f32(&mut self, v: f32) -> String {
        let name = self.fresh("const");
        self.init_f32(&name, &[], &[v])
    }

    /// Anonymous int64 scalar constant (rank 0).
    pub fn scalar_i64(&mut self, v: i64) -> String {
        let name = self.fresh("const");
        self.init_i64(&name, &[], &[v])
    }

    /// Adds a single-output node and returns its (generated) output name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<Attribute>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.node_to(op, inputs, &out, attributes);
        out
    }

    /// Adds a single-output node writing to a chosen name (graph outputs).
    pub fn node_to(&mut self, op: &str, inputs: &[&str], output: &str, attributes: Vec<Attribute>) {
        self.push_node(op, "", inputs, output, attributes);
    }

    /// `Split` of `x` along `axis` into `n` outputs of the sizes in the int64 tensor `sizes`.
    pub fn split(&mut self, x: &str, sizes: &str, axis: i64, n: usize) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|_| self.fresh("split")).collect();
        let name = self.fresh("Split_node");
        self.graph.nodes.push(NodeProto {
            name,
            op_type: "Split".into(),
            domain: String::new(),
            inputs: vec![x.into(), sizes.into()],
            outputs: outs.clone(),
            attributes: vec![Attribute::int("axis", axis)],
        });
        outs
    }

    /// A node of ONNX Runtime's contrib domain (`MatMulNBits`); `finish` imports the domain.
    pub fn ms_node(&mut self, op: &str, inputs: &[&str], attributes: Vec<Attribute>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.push_node(op, MS_DOMAIN, inputs, &out, attributes);
        out
    }

    fn push_node(&mut self, op: &str, domain: &str, inputs: &[&str], output: &str, attributes: Vec<Attribute>) {
        let name = self.fresh(&format!("{op}_node"));
        self.graph.nodes.push(NodeProto {
            name,
            op_type: op.into(),
            domain: domain.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.into()],
            attributes,
        });
    }

    pub fn finish(self) -> ModelProto {
        let contrib = self.graph.nodes.iter().any(|n| n.domain == MS_DOMAIN);
        let mut model = ModelProto::new(self.graph);
        if contrib {
            model.opset_import.push((MS_DOMAIN.into(), 1));
        }
        model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_protobuf() {
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
        let mut b = Vec::new();
        put_int(&mut b, 1, -1);
        assert_eq!(b.len(), 1 + 10, "negative int64 is a ten-byte varint");
    }

    #[test]
    fn encodes_a_tiny_model() {
        let mut g = GraphBuilder::new("g");
        g.input("x", DataType::Float, vec!["batch".into(), 3i64.into()]);
        let w = g.init_f32("w", &[3], &[1.0, 2.0, 3.0]);
        g.node_to("Add", &["x", &w], "y", vec![Attribute::ints("unused", &[1, -2])]);
        g.output("y", DataType::Float, vec!["batch".into(), 3i64.into()]);
        let bytes = g.finish().encode();
        // ir_version field first, then the producer name as a length-delimited string.
        assert_eq!(&bytes[..2], &[0x08, 8]);
        assert_eq!(bytes[2], 0x12);
        let needle = b"prefstream";
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }
}
