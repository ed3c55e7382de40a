//! A small iterative pickle machine that understands only what `torch.save` of a state dict emits.
//!
//! It runs no code: the only callables it knows are an allow-list of four kinds
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`
//! and the `torch.*Storage` types), and "calling" one builds a plain Rust value. Tensors come out as
//! [`TensorMeta`] descriptions (storage key, dtype, offset, shape, strides); their bytes are read
//! later, by the caller, from the zip entries, after every size has been checked.
//!
//! Bounds, all checked before anything is allocated (P is the pickle's size in bytes):
//! - every opcode pushes or stores at most one value, and `Machine::push` and the memo count
//!   them: at most P values in all, on the stack, in the memo and in containers. A value is 24
//!   bytes; the stack holds at most P of them, with at most twice that capacity, so the largest
//!   single allocation is at most 48 P. A new container adds a header of about 56 bytes, a string
//!   a 16-byte header to its bytes (copied from the pickle), the memo is a B-tree of small nodes:
//!   the machine's live memory stays below 128 P plus a constant (the worst pickles the tests
//!   build, one new container per byte after a doubling of the stack, reach 104 P);
//! - containers nest at most [`MAX_DEPTH`] deep and marks at most [`MAX_MARKS`] deep, so dropping a
//!   value recurses at most [`MAX_DEPTH`] levels and the machine itself never recurses;
//! - a container may be filled only while it is not inside another (as `torch.save` writes them), so
//!   values form no cycles and a container's depth, computed when it is filled, stays true;
//! - values are shared through `Rc` (as `BINGET` shares in Python), never deep-copied: a "memo bomb"
//!   that refers to one tuple twice, level after level, costs two pointers per level.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use candle_core::DType;

/// Deepest nesting of containers (tuples, lists, dicts) accepted; a state dict needs about 5.
pub const MAX_DEPTH: u32 = 32;
/// Deepest nesting of `MARK`s accepted; a state dict needs 3.
pub const MAX_MARKS: usize = 64;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 16;
/// Longest module or name of a `GLOBAL` accepted.
const MAX_GLOBAL_LEN: usize = 128;
/// Longest storage key accepted (torch writes decimal numbers).
const MAX_KEY_LEN: usize = 64;

/// The callables of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callable {
    /// `collections.OrderedDict`: `OrderedDict()` is an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`: the tensor itself.
    RebuildParameter,
    /// A `torch.*Storage` type, named in a storage's persistent id; its element type.
    StorageType(DType),
}

/// A storage named by a persistent id: the zip entry `data/{key}` holds `numel` elements of `dtype`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The entry's name under `data/`.
    pub key: String,
    /// The element type.
    pub dtype: DType,
    /// The number of elements torch declares for the storage.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The storage it views.
    pub storage: Rc<StorageRef>,
    /// The view's first element, in elements from the storage's start.
    pub offset: u64,
    /// The view's shape.
    pub shape: Vec<u64>,
    /// The view's strides, in elements.
    pub stride: Vec<u64>,
}

/// A mutable container (list or dict): filled only while `frozen` is false, i.e. until it is placed
/// in another container.
#[derive(Debug, Default)]
struct Container<T> {
    frozen: Cell<bool>,
    /// 1 + the deepest item's depth.
    depth: Cell<u32>,
    items: RefCell<Vec<T>>,
}

/// A tuple: immutable, its depth fixed when it is built.
#[derive(Debug)]
struct Tuple {
    depth: u32,
    items: Vec<Value>,
}

/// A value on the machine's stack or in its memo.
#[derive(Debug, Clone)]
enum Value {
    None,
    /// True or false (no state dict field needs which).
    Bool,
    Int(i64),
    /// A float (no state dict field needs its value).
    Float,
    Str(Rc<str>),
    Tuple(Rc<Tuple>),
    List(Rc<Container<Value>>),
    Dict(Rc<Container<(Value, Value)>>),
    Global(Callable),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorMeta>),
}

impl Value {
    /// What the value is, for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// Container depth: 0 for a leaf (tensors and storages hold no values, only their description).
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(c) => c.depth.get(),
            Value::Dict(c) => c.depth.get(),
            _ => 0,
        }
    }

    /// Marks a list or dict as placed inside another value: it may no longer be filled.
    fn freeze(&self) {
        match self {
            Value::List(c) => c.frozen.set(true),
            Value::Dict(c) => c.frozen.set(true),
            _ => {}
        }
    }
}

/// The pickle opcodes this machine knows (protocols 2 to 5, the subset torch.save uses plus a few).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// The machine's state while it reads one pickle.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open `MARK`; nothing may be popped below the last one.
    marks: Vec<usize>,
    memo: BTreeMap<u32, Value>,
    /// Values pushed or stored so far; at most `data.len()`.
    created: usize,
}

/// Runs the pickle `data` and returns the state dict it builds: its keys in order with their tensor
/// descriptions. An error is one line: the byte offset in the pickle and what is wrong there, or the
/// key whose value is not a tensor.
pub fn read_state_dict(data: &[u8]) -> Result<Vec<(String, Rc<TensorMeta>)>, String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        created: 0,
    };
    let top = loop {
        let at = m.pos;
        let code = m.byte().map_err(|e| format!("data.pkl byte {at}: {e}"))?;
        match m.step(code) {
            Ok(Some(top)) => break top,
            Ok(None) => {}
            Err(e) => return Err(format!("data.pkl byte {at} (opcode 0x{code:02x}): {e}")),
        }
    };
    let Value::Dict(dict) = top else {
        return Err(format!(
            "data.pkl holds a {} where a state dict (a dict of tensors) was expected",
            top.kind()
        ));
    };
    let items = dict.items.borrow();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items.iter() {
        let Value::Str(key) = k else {
            return Err(format!("data.pkl: the state dict has a {} key", k.kind()));
        };
        match v {
            Value::Tensor(t) => out.push((key.to_string(), t.clone())),
            other => {
                return Err(format!(
                    "data.pkl: entry `{key}` is a {}, not a tensor",
                    other.kind()
                ))
            }
        }
    }
    Ok(out)
}

impl Machine<'_> {
    /// Runs one opcode; `Some(value)` at `STOP`.
    fn step(&mut self, code: u8) -> Result<Option<Value>, String> {
        match code {
            op::PROTO => {
                let v = self.byte()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v} is unknown"));
                }
            }
            op::FRAME => {
                let n = u64::from_le_bytes(self.array()?);
                if n > (self.data.len() - self.pos) as u64 {
                    return Err(format!("frame of {n} bytes runs past the end"));
                }
            }
            op::STOP => return self.pop().map(Some),
            op::NONE => self.push(Value::None)?,
            op::NEWTRUE | op::NEWFALSE => self.push(Value::Bool)?,
            op::BININT1 => {
                let v = self.byte()?;
                self.push(Value::Int(v.into()))?
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?
            }
            op::BININT => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?
            }
            op::LONG1 => {
                let n = usize::from(self.byte()?);
                let v = long1(self.take(n)?)?;
                self.push(Value::Int(v))?
            }
            op::BINFLOAT => {
                self.array::<8>()?;
                self.push(Value::Float)?
            }
            op::BINUNICODE => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                let s = self.string(n)?;
                self.push(Value::Str(s))?
            }
            op::SHORT_BINUNICODE => {
                let n = usize::from(self.byte()?);
                let s = self.string(n)?;
                self.push(Value::Str(s))?
            }
            op::EMPTY_TUPLE => self.push(tuple(Vec::new())?)?,
            op::EMPTY_LIST => self.push(Value::List(Rc::new(Container::new())))?,
            op::EMPTY_DICT => self.push(Value::Dict(Rc::new(Container::new())))?,
            op::MARK => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(format!("more than {MAX_MARKS} nested marks"));
                }
                self.marks.push(self.stack.len());
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.push(tuple(items)?)?
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(code - op::TUPLE1 + 1);
                let items = self.pop_n(n)?;
                self.push(tuple(items)?)?
            }
            op::BINPUT => {
                let i = self.byte()?;
                self.memo_put(i.into())?
            }
            op::LONG_BINPUT => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_put(i)?
            }
            op::MEMOIZE => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow".to_string())?;
                self.memo_put(i)?
            }
            op::BINGET => {
                let i = self.byte()?;
                self.memo_get(i.into())?
            }
            op::LONG_BINGET => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_get(i)?
            }
            op::GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(resolve(&module, &name)?))?
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                self.push(Value::Global(resolve(module, name)?))?
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                self.push(Value::Storage(Rc::new(storage_ref(&pid)?)))?
            }
            op::REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let (Value::Global(f), Value::Tuple(args)) = (&callable, &args) else {
                    return Err(format!(
                        "REDUCE of a {} with a {} (expected a global and a tuple)",
                        callable.kind(),
                        args.kind()
                    ));
                };
                self.push(call(*f, &args.items)?)?
            }
            op::BUILD => {
                // an OrderedDict's attributes (the state dict's `_metadata`): not needed, dropped
                let state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) => drop(state),
                    other => return Err(format!("BUILD on a {} is not supported", other.kind())),
                }
            }
            op::SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![key, value])?
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                self.set_items(items)?
            }
            op::APPEND => {
                let value = self.pop()?;
                self.append(vec![value])?
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.append(items)?
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} is not one torch.save of a state dict writes"
                ))
            }
        }
        Ok(None)
    }

    /// The next byte of the pickle.
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or("the pickle ends without STOP")?;
        self.pos += 1;
        Ok(b)
    }

    /// The next `n` bytes of the pickle.
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if n > self.data.len() - self.pos {
            return Err(format!("an argument of {n} bytes runs past the end"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A UTF-8 string of the next `n` bytes (copied: at most the pickle's size in all).
    fn string(&mut self, n: usize) -> Result<Rc<str>, String> {
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(Rc::from)
            .map_err(|_| "string is not valid UTF-8".to_string())
    }

    /// A `GLOBAL` argument: printable ASCII up to a newline, at most [`MAX_GLOBAL_LEN`] bytes.
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(MAX_GLOBAL_LEN + 1)
            .position(|&b| b == b'\n')
            .ok_or("GLOBAL argument without a newline within 128 bytes")?;
        let s = &rest[..n];
        if !s.iter().all(|b| b.is_ascii_graphic()) {
            return Err("GLOBAL argument is not printable ASCII".into());
        }
        self.pos += n + 1;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    /// Pushes a value, counting it against the one-value-per-pickle-byte bound.
    fn push(&mut self, v: Value) -> Result<(), String> {
        self.created += 1;
        if self.created > self.data.len() {
            return Err("more values than the pickle has bytes".into());
        }
        self.stack.push(v);
        Ok(())
    }

    /// The lowest stack length a pop may leave: the last mark's position.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Result<&Value, String> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    /// The last `n` values, above the last mark.
    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, String> {
        if self.stack.len() < self.floor() + n {
            return Err("stack underflow".into());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    /// The values above the last mark, closing it.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.marks.pop().ok_or("no MARK to close")?;
        // every pop respects the mark, so the stack never shrinks below it
        if mark > self.stack.len() {
            return Err("stack underflow".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, i: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.created += 1;
        if self.created > self.data.len() {
            return Err("more values than the pickle has bytes".into());
        }
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<(), String> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} is not set"))?;
        self.push(v)
    }

    /// Adds key-value pairs to the dict on top of the stack.
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let Value::Dict(d) = self.top()? else {
            return Err(format!("SETITEM on a {}", self.top()?.kind()));
        };
        let d = d.clone();
        d.items.borrow_mut().reserve(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.fill(k.depth().max(v.depth()))?;
            k.freeze();
            v.freeze();
            d.items.borrow_mut().push((k, v));
        }
        Ok(())
    }

    /// Appends values to the list on top of the stack.
    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        let Value::List(l) = self.top()? else {
            return Err(format!("APPEND on a {}", self.top()?.kind()));
        };
        let l = l.clone();
        l.items.borrow_mut().reserve(items.len());
        for v in items {
            l.fill(v.depth())?;
            v.freeze();
            l.items.borrow_mut().push(v);
        }
        Ok(())
    }
}

impl<T> Container<T> {
    fn new() -> Self {
        Container {
            frozen: Cell::new(false),
            depth: Cell::new(1),
            items: RefCell::new(Vec::new()),
        }
    }

    /// Checks that an item of depth `child` may be added: the container is not inside another, and
    /// the nesting stays within [`MAX_DEPTH`]. Updates the container's depth.
    fn fill(&self, child: u32) -> Result<(), String> {
        if self.frozen.get() {
            return Err("a container is filled after being placed in another".into());
        }
        let depth = child + 1;
        if depth > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        self.depth.set(self.depth.get().max(depth));
        Ok(())
    }
}

/// A tuple of `items`, which become frozen; its depth is 1 + the deepest item's.
fn tuple(items: Vec<Value>) -> Result<Value, String> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
    }
    items.iter().for_each(Value::freeze);
    Ok(Value::Tuple(Rc::new(Tuple { depth, items })))
}

/// A `LONG1` integer: `bytes` little-endian two's complement, at most 8 of them.
fn long1(bytes: &[u8]) -> Result<i64, String> {
    if bytes.len() > 8 {
        return Err("integer wider than 64 bits".into());
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut a = [if negative { 0xff } else { 0 }; 8];
    a[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(a))
}

/// The allow-list: `module.name` as a [`Callable`], or an error naming it.
fn resolve(module: &str, name: &str) -> Result<Callable, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch", "FloatStorage") => Callable::StorageType(DType::F32),
        ("torch", "HalfStorage") => Callable::StorageType(DType::F16),
        ("torch", "BFloat16Storage") => Callable::StorageType(DType::BF16),
        ("torch", "DoubleStorage") => Callable::StorageType(DType::F64),
        ("torch", "LongStorage") => Callable::StorageType(DType::I64),
        ("torch", "ByteStorage") => Callable::StorageType(DType::U8),
        _ => {
            return Err(format!(
                "global `{module}.{name}` is not allowed (a state dict needs only \
                 collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter \
                 and torch.{{Float,Half,BFloat16,Double,Long,Byte}}Storage)"
            ))
        }
    })
}

/// A storage's persistent id, `('storage', storage_type, key, location, numel)`.
fn storage_ref(pid: &Value) -> Result<StorageRef, String> {
    let bad = || format!("persistent id {} is not a tensor storage", pid.kind());
    let Value::Tuple(t) = pid else {
        return Err(bad());
    };
    let [Value::Str(tag), ty, Value::Str(key), Value::Str(_location), Value::Int(numel)] =
        t.items.as_slice()
    else {
        return Err("persistent id is not ('storage', type, key, location, numel)".into());
    };
    if &**tag != "storage" {
        return Err(bad());
    }
    let Value::Global(Callable::StorageType(dtype)) = ty else {
        return Err(format!(
            "storage type is a {}, not a torch storage type",
            ty.kind()
        ));
    };
    let key_ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !key_ok {
        return Err(format!(
            "storage key {key:?} is not a short alphanumeric name"
        ));
    }
    let numel =
        u64::try_from(*numel).map_err(|_| format!("storage `{key}` has {numel} elements"))?;
    Ok(StorageRef {
        key: key.to_string(),
        dtype: *dtype,
        numel,
    })
}

/// Calls an allowed callable on `args`.
fn call(f: Callable, args: &[Value]) -> Result<Value, String> {
    match f {
        Callable::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::new(Container::new()))),
        Callable::OrderedDict => Err("OrderedDict called with arguments".into()),
        Callable::RebuildTensorV2 => rebuild_tensor(args).map(|t| Value::Tensor(Rc::new(t))),
        Callable::RebuildParameter => match args {
            [t @ Value::Tensor(_), Value::Bool, _hooks] => Ok(t.clone()),
            _ => Err("_rebuild_parameter needs (tensor, requires_grad, hooks)".into()),
        },
        Callable::StorageType(_) => Err("a storage type is called".into()),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
/// metadata])` as a [`TensorMeta`]; sizes, strides and the offset must be non-negative, the rank at
/// most [`MAX_RANK`]. Whether the view fits its storage is checked when the storage is read.
fn rebuild_tensor(args: &[Value]) -> Result<TensorMeta, String> {
    let (storage, offset, size, stride) = match args {
        [Value::Storage(s), Value::Int(o), Value::Tuple(size), Value::Tuple(stride), Value::Bool, _]
        | [Value::Storage(s), Value::Int(o), Value::Tuple(size), Value::Tuple(stride), Value::Bool, _, _] => {
            (s, *o, size, stride)
        }
        _ => {
            let kinds: Vec<&str> = args.iter().map(Value::kind).collect();
            return Err(format!(
                "_rebuild_tensor_v2 needs (storage, int, tuple, tuple, bool, hooks), got ({})",
                kinds.join(", ")
            ));
        }
    };
    let offset = u64::try_from(offset).map_err(|_| format!("storage offset {offset} < 0"))?;
    let dims = |t: &Tuple, what: &str| -> Result<Vec<u64>, String> {
        if t.items.len() > MAX_RANK {
            return Err(format!("tensor {what} has more than {MAX_RANK} dimensions"));
        }
        t.items
            .iter()
            .map(|v| match v {
                Value::Int(i) => u64::try_from(*i).map_err(|_| format!("tensor {what} {i} < 0")),
                other => Err(format!("tensor {what} holds a {}", other.kind())),
            })
            .collect()
    };
    let shape = dims(size, "size")?;
    let stride = dims(stride, "stride")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "tensor size has {} dimensions but its stride {}",
            shape.len(),
            stride.len()
        ));
    }
    Ok(TensorMeta {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PROTO 2, EMPTY_DICT, <body>, STOP`-style pickles written by hand.
    fn run(body: &[u8]) -> Result<Vec<(String, Rc<TensorMeta>)>, String> {
        read_state_dict(body)
    }

    #[test]
    fn empty_dict_is_an_empty_state_dict() {
        assert_eq!(run(b"\x80\x02}q\x00.").unwrap().len(), 0);
    }

    #[test]
    fn long1_is_twos_complement() {
        assert_eq!(long1(&[]).unwrap(), 0);
        assert_eq!(long1(&[0xff]).unwrap(), -1);
        assert_eq!(long1(&[0x00, 0x01]).unwrap(), 256);
        assert_eq!(long1(&[0x00, 0x80]).unwrap(), -32768);
        assert!(long1(&[0; 9]).is_err());
    }

    #[test]
    fn pops_never_cross_a_mark() {
        // MARK then TUPLE1 would take a value from below the mark
        let e = run(b"\x80\x02K\x01(\x85.").unwrap_err();
        assert!(e.contains("stack underflow"), "{e}");
    }

    #[test]
    fn self_containing_list_is_refused() {
        // EMPTY_LIST, BINPUT 0, EMPTY_LIST, APPEND (freezes the inner), BINGET 0 ... the only way to
        // make a cycle is to fill a container that sits inside another
        let e = run(b"\x80\x02]q\x00]q\x01ah\x01h\x00a.").unwrap_err();
        assert!(e.contains("filled after being placed"), "{e}");
    }

    #[test]
    fn nesting_is_bounded() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(op::TUPLE1, 40));
        p.push(op::STOP);
        let e = run(&p).unwrap_err();
        assert!(e.contains("deeper than 32"), "{e}");
    }

    #[test]
    fn unknown_global_is_named() {
        let e = run(b"\x80\x02cos\nsystem\n.").unwrap_err();
        assert!(e.contains("`os.system` is not allowed"), "{e}");
    }
}
