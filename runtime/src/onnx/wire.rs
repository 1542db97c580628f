//! Where each initializer's float values lie in the `.onnx` file's bytes, found with prost's
//! wire-format primitives, so that export rewrites those bytes in place and nothing else:
//! every other field, unknown ones included, stays byte for byte as the file had it.

use std::ops::Range;

use prost::encoding::{decode_key, decode_varint, WireType};

/// ONNX field numbers on the path to the initializers' values.
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_RAW_DATA: u32 = 9;

/// Where an initializer's values are stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    /// Byte ranges holding the little-endian f32 values, in element order: one range for
    /// `raw_data` or packed `float_data`, several for unpacked or split `float_data`.
    pub ranges: Vec<Range<usize>>,
}

/// One field of a message: number, wire type and the byte range of its value (for a
/// length-delimited field, of its contents).
struct Field {
    number: u32,
    wire: WireType,
    value: Range<usize>,
}

/// The fields of the message in `bytes[range]`, in file order.
fn fields(bytes: &[u8], range: Range<usize>) -> Result<Vec<Field>, String> {
    let end = range.end;
    let mut buf = &bytes[range];
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (number, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let start = end - buf.len();
        let len = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|e| e.to_string())?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let n = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                usize::try_from(n).map_err(|_| "length out of range".to_string())?
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(format!("field {number} uses protobuf groups"));
            }
        };
        let value_start = end - buf.len();
        if len > buf.len() {
            return Err(format!(
                "field {number} runs past the end of its message ({len} bytes, {} left)",
                buf.len()
            ));
        }
        buf = &buf[len..];
        out.push(Field {
            number,
            wire,
            value: if wire == WireType::Varint {
                start..value_start
            } else {
                value_start..value_start + len
            },
        });
    }
    Ok(out)
}

/// The payload of every initializer of the model's graph, in graph order (the order prost
/// decodes them in).
pub fn initializer_payloads(bytes: &[u8]) -> Result<Vec<Payload>, String> {
    let graphs: Vec<Field> = fields(bytes, 0..bytes.len())?
        .into_iter()
        .filter(|f| f.number == MODEL_GRAPH)
        .collect();
    // Two `graph` fields would be merged by a decoder: not written by any exporter.
    let [graph] = graphs.as_slice() else {
        return Err(format!(
            "the model holds {} `graph` fields, expected one",
            graphs.len()
        ));
    };
    let mut out = Vec::new();
    for init in fields(bytes, graph.value.clone())?
        .into_iter()
        .filter(|f| f.number == GRAPH_INITIALIZER && f.wire == WireType::LengthDelimited)
    {
        let mut payload = Payload::default();
        let mut raw = 0;
        for f in fields(bytes, init.value.clone())? {
            match (f.number, f.wire) {
                (TENSOR_RAW_DATA, WireType::LengthDelimited) => {
                    raw += 1;
                    payload.ranges = vec![f.value];
                }
                (TENSOR_FLOAT_DATA, WireType::LengthDelimited | WireType::ThirtyTwoBit) => {
                    payload.ranges.push(f.value)
                }
                _ => {}
            }
        }
        if raw > 1 {
            return Err("an initializer holds two `raw_data` fields".into());
        }
        out.push(payload);
    }
    Ok(out)
}

/// Writes `values` (little-endian f32) over the payload's bytes. The payload must hold
/// exactly `values.len()` floats.
pub fn write_payload(bytes: &mut [u8], payload: &Payload, values: &[f32]) -> Result<(), String> {
    let total: usize = payload.ranges.iter().map(|r| r.len()).sum();
    if total != values.len() * 4 {
        return Err(format!(
            "the stored values take {total} bytes, {} floats need {}",
            values.len(),
            values.len() * 4
        ));
    }
    let mut v = values.iter();
    for r in &payload.ranges {
        for chunk in bytes[r.clone()].chunks_exact_mut(4) {
            if let Some(x) = v.next() {
                chunk.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    Ok(())
}
