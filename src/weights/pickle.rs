//! A pickle reader for PyTorch checkpoints that never executes code.
//!
//! Format: the Python pickle protocol (PEP 307 for protocol 2, PEP 3154 for 4), as written by
//! `torch.save` (protocol 2) into `data.pkl` of its zip archive. Only the opcodes a checkpoint uses
//! are interpreted; `GLOBAL` names are never imported — the few PyTorch reconstructors that matter
//! (`_rebuild_tensor_v2`, `_rebuild_parameter`, `OrderedDict`, `torch.Size`) are recognised by name
//! and everything else (e.g. `argparse.Namespace`, DeepSpeed objects) stays an opaque
//! [`Value::Object`].

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// A tensor element type as PyTorch names its storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            DType::F64 => tch::Kind::Double,
            DType::F32 => tch::Kind::Float,
            DType::F16 => tch::Kind::Half,
            DType::BF16 => tch::Kind::BFloat16,
            DType::I64 => tch::Kind::Int64,
            DType::I32 => tch::Kind::Int,
            DType::I16 => tch::Kind::Int16,
            DType::I8 => tch::Kind::Int8,
            DType::U8 => tch::Kind::Uint8,
            DType::Bool => tch::Kind::Bool,
        }
    }
}

/// A reference to a tensor inside the checkpoint: nothing is read until it is materialised.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key: the zip entry `<archive>/data/<key>`.
    pub key: String,
    pub dtype: DType,
    /// Offset into the storage, in elements.
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered (OrderedDict and dict alike).
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// An object the reader does not reconstruct: its class, constructor arguments and state.
    Object {
        class: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
    Storage {
        dtype: DType,
        key: String,
    },
    Tensor(TensorRef),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Look up a string key in a dict (or the state dict of an object).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            Value::Object { state: Some(s), .. } => s.get(key),
            _ => None,
        }
    }

    fn ints(&self) -> Result<Vec<i64>> {
        match self {
            Value::Tuple(v) | Value::List(v) => v
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Ok(*i),
                    other => bail!("expected an int, found {other:?}"),
                })
                .collect(),
            other => bail!("expected a tuple of ints, found {other:?}"),
        }
    }
}

/// Interpret a pickle. Reconstructs only data; never imports or calls anything.
pub fn parse(data: &[u8]) -> Result<Value> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .context("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle: unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle: stack underflow")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("pickle: no mark")?;
        if m > self.stack.len() {
            bail!("pickle: mark beyond stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle: empty stack")
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Str(
            String::from_utf8_lossy(self.take(n)?).into_owned(),
        ))
    }

    fn bytes(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                return self.pop(); // STOP
            }
            let known = self.stack_op(op)?
                || self.scalar(op)?
                || self.container(op)?
                || self.memo_op(op)?
                || self.object(op)?;
            if !known {
                bail!("pickle: unsupported opcode 0x{op:02x} at byte {at}");
            }
        }
    }

    /// The length before a sized string or bytes opcode: 1 byte for the short forms, 8 for the
    /// `…8` forms, else 4.
    fn length(&mut self, op: u8) -> Result<usize> {
        Ok(match op {
            0x8c | b'U' | b'C' => self.u8()? as usize,
            0x8d | 0x8e => self.u64()? as usize,
            _ => self.u32()? as usize,
        })
    }

    /// PROTO and FRAME (skipped), MARK, POP, POP_MARK, DUP. Whether `op` is one of these.
    fn stack_op(&mut self, op: u8) -> Result<bool> {
        match op {
            0x80 => {
                self.u8()?; // PROTO
            }
            0x95 => {
                self.u64()?; // FRAME
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// None, booleans, integers, floats, strings and bytes: pushed. Whether `op` is one of these.
    fn scalar(&mut self, op: u8) -> Result<bool> {
        match op {
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32 as i64;
                self.stack.push(Value::Int(v))
            }
            b'K' => {
                let v = self.u8()? as i64;
                self.stack.push(Value::Int(v))
            }
            b'M' => {
                let v = self.u16()? as i64;
                self.stack.push(Value::Int(v))
            }
            0x8a => {
                let n = self.u8()? as usize;
                let b = self.take(n)?.to_vec();
                self.stack.push(Value::Int(long_le(&b)?))
            }
            0x8b => {
                let n = self.u32()? as usize;
                let b = self.take(n)?.to_vec();
                self.stack.push(Value::Int(long_le(&b)?))
            }
            b'I' => {
                let l = self.line()?;
                self.stack.push(match l.as_str() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().with_context(|| format!("pickle INT {s:?}"))?),
                })
            }
            b'L' => {
                let l = self.line()?;
                let v = l
                    .trim_end_matches('L')
                    .parse()
                    .with_context(|| format!("pickle LONG {l:?}"))?;
                self.stack.push(Value::Int(v))
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into()?);
                self.stack.push(Value::Float(v))
            }
            b'F' => {
                let l = self.line()?;
                self.stack.push(Value::Float(
                    l.parse().with_context(|| format!("pickle FLOAT {l:?}"))?,
                ))
            }
            // BINUNICODE / BINSTRING, SHORT_ forms, BINUNICODE8: a length, then the text.
            b'X' | b'T' | 0x8c | b'U' | 0x8d => {
                let n = self.length(op)?;
                let v = self.string(n)?;
                self.stack.push(v)
            }
            // BINBYTES, SHORT_BINBYTES, BINBYTES8.
            b'B' | b'C' | 0x8e => {
                let n = self.length(op)?;
                let v = self.bytes(n)?;
                self.stack.push(v)
            }
            b'V' => {
                let l = self.line()?;
                self.stack.push(Value::Str(l))
            }
            b'S' => {
                let l = self.line()?;
                self.stack.push(Value::Str(
                    l.trim_matches(|c| c == '\'' || c == '"').to_string(),
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Tuples, lists, dicts (and sets, kept as lists): built from the stack or the mark, or extended. Whether `op` is one of these.
    fn container(&mut self, op: u8) -> Result<bool> {
        match op {
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b']' => self.stack.push(Value::List(Vec::new())),
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            0x8f => self.stack.push(Value::List(Vec::new())), // EMPTY_SET, kept as a list
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    bail!("pickle: stack underflow");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items))
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(items))
            }
            b'd' => {
                let items = self.pop_mark()?;
                let v = pairs(items)?;
                self.stack.push(Value::Dict(v))
            }
            b'a' => {
                let v = self.pop()?;
                match self.top()? {
                    Value::List(l) => l.push(v),
                    other => bail!("pickle APPEND to {other:?}"),
                }
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                match self.top()? {
                    Value::List(l) => l.extend(items),
                    other => bail!("pickle APPENDS to {other:?}"),
                }
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_items(self.top()?, vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let kv = pairs(items)?;
                set_items(self.top()?, kv)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The memo: PUT / MEMOIZE store the top, GET pushes a stored value. Whether `op` is one of these.
    fn memo_op(&mut self, op: u8) -> Result<bool> {
        match op {
            b'q' => {
                let i = self.u8()? as u32;
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            b'r' => {
                let i = self.u32()?;
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            0x94 => {
                let i = self.memo.len() as u32;
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            b'p' => {
                let i: u32 = self.line()?.parse()?;
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            b'h' => {
                let i = self.u8()? as u32;
                let v = self
                    .memo
                    .get(&i)
                    .cloned()
                    .with_context(|| format!("pickle: memo {i} unset"))?;
                self.stack.push(v)
            }
            b'j' => {
                let i = self.u32()?;
                let v = self
                    .memo
                    .get(&i)
                    .cloned()
                    .with_context(|| format!("pickle: memo {i} unset"))?;
                self.stack.push(v)
            }
            b'g' => {
                let i: u32 = self.line()?.parse()?;
                let v = self
                    .memo
                    .get(&i)
                    .cloned()
                    .with_context(|| format!("pickle: memo {i} unset"))?;
                self.stack.push(v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals, REDUCE / NEWOBJ (only the classes a torch checkpoint needs), BUILD, persistent ids. Whether `op` is one of these.
    fn object(&mut self, op: u8) -> Result<bool> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global { module, name })
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        self.stack.push(Value::Global { module, name })
                    }
                    other => bail!("pickle STACK_GLOBAL with {other:?}"),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = reduce(f, args)?;
                self.stack.push(v)
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = reduce(cls, args)?;
                self.stack.push(v)
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = reduce(cls, args)?;
                self.stack.push(v)
            }
            b'b' => {
                let state = self.pop()?;
                build(self.top()?, state);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent(pid)?;
                self.stack.push(v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn long_le(b: &[u8]) -> Result<i64> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 8 {
        bail!("pickle: integer wider than 64 bits");
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let mut buf = [if neg { 0xff } else { 0 }; 8];
    buf[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(buf))
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("pickle: odd number of dict items");
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: &mut Value, kv: Vec<(Value, Value)>) -> Result<()> {
    match target {
        Value::Dict(d) => {
            for (k, v) in kv {
                match d.iter_mut().find(|(old, _)| *old == k) {
                    Some(slot) => slot.1 = v,
                    None => d.push((k, v)),
                }
            }
            Ok(())
        }
        // Items set on an opaque object (e.g. a dict subclass) become its state.
        Value::Object { state, .. } => {
            let s = state.get_or_insert_with(|| Box::new(Value::Dict(Vec::new())));
            set_items(s, kv)
        }
        other => bail!("pickle SETITEM on {other:?}"),
    }
}

fn build(target: &mut Value, state: Value) {
    // Otherwise `_rebuild_parameter`'s BUILD or OrderedDict's `__dict__`: nothing to keep.
    if let Value::Object { state: s, .. } = target {
        *s = Some(Box::new(state));
    }
}

fn reduce(f: Value, args: Value) -> Result<Value> {
    let Value::Global { module, name } = &f else {
        return Ok(Value::Object {
            class: Box::new(f),
            args: Box::new(args),
            state: None,
        });
    };
    let a = match &args {
        Value::Tuple(a) => a.as_slice(),
        _ => &[],
    };
    Ok(match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Value::Dict(Vec::new()),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let (storage, offset, size, stride) = match a {
                [s, Value::Int(o), size, stride, ..] => (s, *o, size.ints()?, stride.ints()?),
                _ => bail!("pickle: unexpected arguments to {name}: {args:?}"),
            };
            let Value::Storage { dtype, key } = storage else {
                bail!("pickle: {name} without a storage")
            };
            Value::Tensor(TensorRef {
                key: key.clone(),
                dtype: *dtype,
                offset,
                size,
                stride,
            })
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => a
            .first()
            .cloned()
            .context("pickle: _rebuild_parameter without data")?,
        ("torch", "Size") => Value::Tuple(match a.first() {
            Some(Value::Tuple(t)) => t.clone(),
            _ => Vec::new(),
        }),
        _ => Value::Object {
            class: Box::new(f),
            args: Box::new(args),
            state: None,
        },
    })
}

fn persistent(pid: Value) -> Result<Value> {
    match pid {
        Value::Tuple(t) if t.first().and_then(Value::as_str) == Some("storage") && t.len() >= 3 => {
            let dtype = match &t[1] {
                Value::Global { name, .. } => DType::from_storage(name)
                    .with_context(|| format!("pickle: unknown storage type {name}"))?,
                other => bail!("pickle: storage type {other:?}"),
            };
            let key = match &t[2] {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => bail!("pickle: storage key {other:?}"),
            };
            Ok(Value::Storage { dtype, key })
        }
        other => bail!("pickle: unsupported persistent id {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_containers_and_ints() {
        // pickle.dumps({'a': [1, 300, -2, 2**40], 'b': (True, None, 1.5)}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01M,\x01J\xfe\xff\xff\xff\x8a\x06\x00\x00\x00\x00\x00\x01eX\x01\x00\x00\x00bq\x03\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87q\x04u.";
        let v = parse(data).unwrap();
        assert_eq!(
            v.get("a").unwrap(),
            &Value::List(vec![
                Value::Int(1),
                Value::Int(300),
                Value::Int(-2),
                Value::Int(1 << 40)
            ])
        );
        assert_eq!(
            v.get("b").unwrap(),
            &Value::Tuple(vec![Value::Bool(true), Value::None, Value::Float(1.5)])
        );
    }

    #[test]
    fn unknown_opcodes_and_truncation_are_errors() {
        assert!(parse(b"\x80\x02\xff.").is_err());
        assert!(parse(b"\x80\x02X\x05\x00\x00\x00ab").is_err());
    }
}
