//! A bounded interpreter for the pickle subset `torch.save` writes for a
//! state dict (protocols 2 to 5).
//!
//! Objects live in an arena and are referred to by index, so a memo `GET`
//! copies an index, never an object: a "billion laughs" stream costs what its
//! bytes cost. Nothing recurses; every growth (objects, references held by
//! containers, stack, marks, memo, nesting) has a limit, and every length is
//! bounded by the bytes that remain. Callables are the few globals of
//! `pickle_guard`, each checked for its exact argument count and
//! types when `REDUCE` meets it, so the result is a dict of name -> tensor
//! view whose every field has been checked.

use std::collections::HashMap;

use crate::pickle_guard::{self, Global, StorageType};

/// Objects the stream may create (opcodes that push a new value).
pub const MAX_OBJECTS: usize = 1 << 22;
/// References that containers may hold in all (tuple items, dict entries).
pub const MAX_REFERENCES: usize = 1 << 24;
/// Values on the stack at once.
pub const MAX_STACK: usize = 1 << 20;
/// Open `MARK`s at once.
pub const MAX_MARKS: usize = 1 << 10;
/// Memo entries.
pub const MAX_MEMO: usize = 1 << 22;
/// Nesting of containers (a state dict needs 4 or 5 levels).
pub const MAX_DEPTH: u16 = 32;
/// Dimensions of a tensor.
pub const MAX_RANK: usize = 64;

/// Why a pickle was refused. `at` is the byte offset of the opcode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The stream ends inside an opcode or before `STOP`.
    #[error("the pickle ends early (byte {at})")]
    Truncated {
        /// Where the missing bytes were expected.
        at: usize,
    },
    /// An opcode outside the state-dict subset.
    #[error(
        "pickle opcode 0x{op:02x} ({name}) at byte {at} is not used by a torch.save state dict"
    )]
    Opcode {
        /// The opcode byte.
        op: u8,
        /// Its name in Python's `pickletools`.
        name: &'static str,
        /// Where.
        at: usize,
    },
    /// A global outside the allow-list; nothing was executed.
    #[error("the pickle names the global `{module}.{name}` (byte {at}), which a state dict does not need")]
    Global {
        /// Module.
        module: String,
        /// Name.
        name: String,
        /// Where.
        at: usize,
    },
    /// A structure limit was reached.
    #[error("the pickle exceeds the limit of {limit} {what} (byte {at})")]
    Limit {
        /// What grew.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// Where.
        at: usize,
    },
    /// Anything else that is not a well-formed state dict.
    #[error("{reason} (pickle byte {at})")]
    Malformed {
        /// What is wrong.
        reason: String,
        /// Where.
        at: usize,
    },
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    /// The storage's key (its entry is `<archive>/data/<key>`).
    pub storage_key: String,
    /// The storage's element type.
    pub storage_type: StorageType,
    /// The storage's length in elements, as the pickle claims it.
    pub storage_numel: u64,
    /// Offset of the first element, in elements.
    pub offset: u64,
    /// Shape.
    pub size: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
}

impl TensorView {
    /// Number of elements (checked).
    pub fn numel(&self) -> Option<u64> {
        self.size.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// One past the largest storage element the view reaches (0 when the view
    /// is empty), checked.
    pub fn storage_end(&self) -> Option<u64> {
        if self.size.contains(&0) {
            return Some(0);
        }
        let mut last = self.offset;
        for (&d, &s) in self.size.iter().zip(&self.stride) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }

    /// Whether the view is the row-major layout of its shape.
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1u64;
        for (&d, &s) in self.size.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }
}

/// The state dict: names and tensors, in the pickle's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDict {
    /// `(name, tensor)` pairs; names are unique.
    pub tensors: Vec<(String, TensorView)>,
}

type Id = u32;

#[derive(Debug)]
enum Obj {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Box<str>),
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage(Box<Storage>),
    Tensor(Box<TensorView>),
}

#[derive(Debug)]
struct Storage {
    key: String,
    storage_type: StorageType,
    numel: u64,
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool => "bool",
            Obj::Int(_) => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

struct Node {
    obj: Obj,
    depth: u16,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    at: usize,
    arena: Vec<Node>,
    references: usize,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

/// Reads a `torch.save` state dict's pickle (`data.pkl`) without executing
/// anything: a dict (or `OrderedDict`) of string keys to tensors.
pub fn parse_state_dict(data: &[u8]) -> Result<StateDict, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        at: 0,
        arena: Vec::new(),
        references: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let top = m.run()?;
    m.state_dict(top)
}

impl<'a> Machine<'a> {
    fn malformed<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed {
            reason: reason.into(),
            at: self.at,
        })
    }

    fn limit(&self, what: &'static str, limit: usize) -> PickleError {
        PickleError::Limit {
            what,
            limit,
            at: self.at,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let data = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated { at: self.pos })?;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, PickleError> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// A length field: it can never exceed the bytes that remain.
    fn len(&mut self, n: usize) -> Result<usize, PickleError> {
        let at = self.pos;
        let v = self.uint(n)?;
        usize::try_from(v)
            .ok()
            .filter(|&l| l <= self.data.len() - self.pos)
            .ok_or(PickleError::Truncated { at })
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let at = self.pos;
        let data = self.data;
        let rest = &data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated { at })?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).or_else(|_| self.malformed("a global's name is not UTF-8"))
    }

    fn alloc(&mut self, obj: Obj, depth: u16) -> Result<Id, PickleError> {
        if self.arena.len() >= MAX_OBJECTS {
            return Err(self.limit("objects", MAX_OBJECTS));
        }
        if depth > MAX_DEPTH {
            return Err(self.limit("nesting levels", usize::from(MAX_DEPTH)));
        }
        let id = self.arena.len() as Id;
        self.arena.push(Node { obj, depth });
        Ok(id)
    }

    fn push(&mut self, id: Id) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.limit("stack entries", MAX_STACK));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Result<(), PickleError> {
        let id = self.alloc(obj, 0)?;
        self.push(id)
    }

    /// The floor of the stack: values below the last MARK are out of reach,
    /// as in Python's unpickler.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return self.malformed("an opcode takes a value from an empty stack");
        }
        self.stack
            .pop()
            .ok_or(PickleError::Truncated { at: self.at })
    }

    fn top(&self) -> Result<Id, PickleError> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.floor() => Ok(id),
            _ => self.malformed("an opcode reads the top of an empty stack"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(mark) = self.marks.pop().filter(|&m| m <= self.stack.len()) else {
            return self.malformed("an opcode needs a MARK and there is none");
        };
        Ok(self.stack.split_off(mark))
    }

    fn depth(&self, id: Id) -> u16 {
        self.arena[id as usize].depth
    }

    fn obj(&self, id: Id) -> &Obj {
        &self.arena[id as usize].obj
    }

    fn reference(&mut self, n: usize) -> Result<(), PickleError> {
        self.references = self
            .references
            .checked_add(n)
            .filter(|&r| r <= MAX_REFERENCES)
            .ok_or_else(|| self.limit("references held by containers", MAX_REFERENCES))?;
        Ok(())
    }

    fn tuple(&mut self, items: Vec<Id>) -> Result<(), PickleError> {
        self.reference(items.len())?;
        let depth = items
            .iter()
            .map(|&i| self.depth(i))
            .max()
            .map_or(0, |d| d + 1);
        let id = self.alloc(Obj::Tuple(items.into_boxed_slice()), depth)?;
        self.push(id)
    }

    /// Appends to the list or sets into the dict `target`; its depth grows
    /// with what it holds.
    fn extend(&mut self, target: Id, items: Vec<Id>) -> Result<(), PickleError> {
        self.reference(items.len())?;
        let inner = items.iter().map(|&i| self.depth(i)).max().unwrap_or(0);
        let depth = self.depth(target).max(inner.saturating_add(1));
        if depth > MAX_DEPTH {
            return Err(self.limit("nesting levels", usize::from(MAX_DEPTH)));
        }
        let at = self.at;
        let node = &mut self.arena[target as usize];
        node.depth = depth;
        match &mut node.obj {
            Obj::List(l) => l.extend(items),
            Obj::Dict(d) => {
                if !items.len().is_multiple_of(2) {
                    return Err(PickleError::Malformed {
                        reason: "SETITEMS with an odd number of values".into(),
                        at,
                    });
                }
                d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
            }
            other => {
                let kind = other.kind();
                return self.malformed(format!("items added to a {kind}, not a list or dict"));
            }
        }
        Ok(())
    }

    fn memo_put(&mut self, index: u32) -> Result<(), PickleError> {
        let id = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(self.limit("memo entries", MAX_MEMO));
        }
        self.memo.insert(index, id);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), PickleError> {
        let Some(&id) = self.memo.get(&index) else {
            return self.malformed(format!("memo entry {index} read before it is written"));
        };
        self.push(id)
    }

    fn string(&mut self, n: usize) -> Result<(), PickleError> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes)
            .map(Box::from)
            .or_else(|_| self.malformed("a string is not UTF-8"))?;
        self.push_new(Obj::Str(s))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let g = pickle_guard::resolve(module, name).ok_or_else(|| PickleError::Global {
            module: module.to_string(),
            name: name.to_string(),
            at: self.at,
        })?;
        self.push_new(Obj::Global(g))
    }

    /// Runs to STOP; returns the value it leaves.
    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            self.at = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    let v = self.uint(1)?;
                    if !(2..=5).contains(&v) {
                        return self.malformed(format!("pickle protocol {v}, expected 2 to 5"));
                    }
                }
                // FRAME: a hint for buffered readers; the bytes follow inline.
                0x95 => {
                    self.uint(8)?;
                }
                b'.' => {
                    if !self.marks.is_empty() || self.stack.len() != 1 {
                        return self.malformed(format!(
                            "STOP with {} values and {} open MARKs, expected one value",
                            self.stack.len(),
                            self.marks.len()
                        ));
                    }
                    return self.pop();
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.limit("open MARKs", MAX_MARKS));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'N' => self.push_new(Obj::None)?,
                0x88 | 0x89 => self.push_new(Obj::Bool)?,
                b'K' => {
                    let v = self.uint(1)? as i64;
                    self.push_new(Obj::Int(v))?
                }
                b'M' => {
                    let v = self.uint(2)? as i64;
                    self.push_new(Obj::Int(v))?
                }
                b'J' => {
                    let v = i64::from(self.uint(4)? as u32 as i32);
                    self.push_new(Obj::Int(v))?
                }
                0x8a | 0x8b => {
                    let n = self.len(if op == 0x8a { 1 } else { 4 })?;
                    let bytes = self.take(n)?;
                    match long(bytes) {
                        Some(v) => self.push_new(Obj::Int(v))?,
                        None => {
                            return self
                                .malformed(format!("an integer of {n} bytes, wider than 64 bits"))
                        }
                    }
                }
                b'G' => {
                    self.take(8)?;
                    self.push_new(Obj::Float)?
                }
                0x8c => {
                    let n = self.len(1)?;
                    self.string(n)?
                }
                b'X' => {
                    let n = self.len(4)?;
                    self.string(n)?
                }
                0x8d => {
                    let n = self.len(8)?;
                    self.string(n)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (self.obj(module), self.obj(name))
                    else {
                        return self.malformed("STACK_GLOBAL without two strings");
                    };
                    let (module, name) = (module.to_string(), name.to_string());
                    self.global(&module, &name)?
                }
                b')' => self.tuple(Vec::new())?,
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < self.floor() + n {
                        return self.malformed(format!("TUPLE{n} with fewer than {n} values"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.tuple(items)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                b']' => self.push_new(Obj::List(Vec::new()))?,
                b'}' => self.push_new(Obj::Dict(Vec::new()))?,
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.extend(list, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.extend(list, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.extend(dict, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.extend(dict, items)?
                }
                b'q' => {
                    let i = self.uint(1)? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.uint(4)? as u32;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.limit("memo entries", MAX_MEMO))?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.uint(1)? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.uint(4)? as u32;
                    self.memo_get(i)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(pid)?;
                    self.push_new(Obj::Storage(Box::new(storage)))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?
                }
                b'b' => {
                    // An OrderedDict's `__dict__` (torch's `_metadata`):
                    // PyTorch ignores it for loading, and so do we.
                    self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.obj(target), Obj::Dict(_)) {
                        let kind = self.obj(target).kind();
                        return self
                            .malformed(format!("BUILD on a {kind}, expected an OrderedDict"));
                    }
                }
                other => {
                    return Err(PickleError::Opcode {
                        op: other,
                        name: opcode_name(other),
                        at: self.at,
                    })
                }
            }
        }
    }

    /// `('storage', storage_type, key, location, numel)`.
    fn persistent_storage(&self, pid: Id) -> Result<Storage, PickleError> {
        let Obj::Tuple(items) = self.obj(pid) else {
            return self.malformed("a persistent id that is not a tuple");
        };
        let [tag, ty, key, location, numel] = items[..] else {
            return self.malformed(format!(
                "a persistent id of {} values, expected ('storage', type, key, location, numel)",
                items.len()
            ));
        };
        let (
            Obj::Str(tag),
            Obj::Global(Global::Storage(storage_type)),
            Obj::Str(key),
            Obj::Str(_),
            Obj::Int(numel),
        ) = (
            self.obj(tag),
            self.obj(ty),
            self.obj(key),
            self.obj(location),
            self.obj(numel),
        )
        else {
            return self.malformed(
                "a persistent id that is not ('storage', <torch storage class>, key, location, numel)",
            );
        };
        if &**tag != "storage" {
            return self.malformed(format!(
                "a persistent id of kind `{tag}`, expected `storage`"
            ));
        }
        let Ok(numel) = u64::try_from(*numel) else {
            return self.malformed(format!("storage `{key}` has {numel} elements"));
        };
        Ok(Storage {
            key: key.to_string(),
            storage_type: *storage_type,
            numel,
        })
    }

    fn reduce(&mut self, callable: Id, args: Id) -> Result<(), PickleError> {
        let Obj::Global(g) = *self.obj(callable) else {
            let kind = self.obj(callable).kind();
            return self.malformed(format!("REDUCE calls a {kind}, not an allowed global"));
        };
        let Obj::Tuple(items) = self.obj(args) else {
            let kind = self.obj(args).kind();
            return self.malformed(format!(
                "REDUCE with a {kind} as arguments, expected a tuple"
            ));
        };
        let n = items.len();
        match g {
            Global::OrderedDict if n == 0 => self.push_new(Obj::Dict(Vec::new())),
            Global::RebuildTensorV2 if n == 6 || n == 7 => {
                let items = items.to_vec();
                let view = self.rebuild_tensor(&items)?;
                self.push_new(Obj::Tensor(Box::new(view)))
            }
            Global::RebuildParameter if n == 3 => {
                let tensor = items[0];
                if !matches!(self.obj(tensor), Obj::Tensor(_)) {
                    return self.malformed("_rebuild_parameter of something that is not a tensor");
                }
                self.push(tensor)
            }
            Global::Storage(t) => self.malformed(format!("REDUCE calls torch.{}", t.name())),
            _ => {
                let expected = match g {
                    Global::OrderedDict => "0",
                    Global::RebuildTensorV2 => "6 or 7",
                    _ => "3",
                };
                self.malformed(format!(
                    "REDUCE of {g:?} with {n} arguments, expected {expected}"
                ))
            }
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    /// backward_hooks[, metadata])`; the last three do not change the values.
    fn rebuild_tensor(&self, args: &[Id]) -> Result<TensorView, PickleError> {
        let Obj::Storage(storage) = self.obj(args[0]) else {
            let kind = self.obj(args[0]).kind();
            return self.malformed(format!(
                "_rebuild_tensor_v2 of a {kind}, expected a storage"
            ));
        };
        let offset = self.uints(&[args[1]], "offset")?[0];
        let (Obj::Tuple(size), Obj::Tuple(stride)) = (self.obj(args[2]), self.obj(args[3])) else {
            return self.malformed("a tensor's size and stride are not tuples");
        };
        if size.len() != stride.len() || size.len() > MAX_RANK {
            return self.malformed(format!(
                "a tensor with {} sizes and {} strides (at most {MAX_RANK})",
                size.len(),
                stride.len()
            ));
        }
        let view = TensorView {
            storage_key: storage.key.clone(),
            storage_type: storage.storage_type,
            storage_numel: storage.numel,
            offset,
            size: self.uints(size, "size")?,
            stride: self.uints(stride, "stride")?,
        };
        // The view must lie inside the storage the pickle declares; the
        // storage's real bytes are checked against the archive later.
        let fits = view
            .numel()
            .zip(view.storage_end())
            .is_some_and(|(_, end)| end <= view.storage_numel);
        if !fits {
            return self.malformed(format!(
                "a tensor of size {:?}, stride {:?} at offset {} does not fit its storage `{}` of {} elements",
                view.size, view.stride, view.offset, view.storage_key, view.storage_numel
            ));
        }
        Ok(view)
    }

    fn uints(&self, ids: &[Id], what: &str) -> Result<Vec<u64>, PickleError> {
        ids.iter()
            .map(|&i| match self.obj(i) {
                Obj::Int(v) if *v >= 0 => Ok(*v as u64),
                Obj::Int(v) => self.malformed(format!("a tensor {what} of {v}")),
                other => {
                    let kind = other.kind();
                    self.malformed(format!("a tensor {what} that is a {kind}, not an int"))
                }
            })
            .collect()
    }

    fn state_dict(&self, top: Id) -> Result<StateDict, PickleError> {
        let Obj::Dict(items) = self.obj(top) else {
            let kind = self.obj(top).kind();
            return self.malformed(format!("the pickle holds a {kind}, not a state dict"));
        };
        let mut seen = std::collections::HashSet::new();
        let mut tensors = Vec::with_capacity(items.len());
        for &(k, v) in items {
            let Obj::Str(name) = self.obj(k) else {
                let kind = self.obj(k).kind();
                return self.malformed(format!("a state-dict key that is a {kind}, not a string"));
            };
            let Obj::Tensor(view) = self.obj(v) else {
                let kind = self.obj(v).kind();
                return self.malformed(format!(
                    "state-dict entry `{name}` is a {kind}, not a tensor"
                ));
            };
            if !seen.insert(&**name) {
                return self.malformed(format!("state-dict key `{name}` appears twice"));
            }
            tensors.push((name.to_string(), (**view).clone()));
        }
        Ok(StateDict { tensors })
    }
}

/// A little-endian two's-complement integer of up to 8 bytes.
fn long(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    if bytes.is_empty() {
        return Some(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'c' => "GLOBAL",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82..=0x84 => "EXT",
        b'B' | b'C' | 0x8e => "BINBYTES",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'T' | b'U' => "BINSTRING",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'P' => "PERSID",
        b'g' => "GET",
        b'p' => "PUT",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'd' => "DICT",
        b'l' => "LIST",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_is_twos_complement_up_to_64_bits() {
        assert_eq!(long(&[]), Some(0));
        assert_eq!(long(&[0xff]), Some(-1));
        assert_eq!(long(&[0x00, 0x80]), Some(-32768));
        assert_eq!(long(&[0, 0, 0, 0, 0, 0, 0, 0x40]), Some(1 << 62));
        assert_eq!(long(&[0; 9]), None);
    }

    #[test]
    fn views_know_their_reach_and_contiguity() {
        let v = |size: Vec<u64>, stride: Vec<u64>, offset| TensorView {
            storage_key: "0".into(),
            storage_type: StorageType::Float,
            storage_numel: 100,
            offset,
            size,
            stride,
        };
        let t = v(vec![4, 3], vec![1, 6], 2);
        assert_eq!(t.storage_end(), Some(2 + 3 + 12 + 1));
        assert!(!t.is_contiguous());
        assert!(v(vec![2, 1, 3], vec![3, 99, 1], 0).is_contiguous());
        assert_eq!(v(vec![0, 5], vec![5, 1], 7).storage_end(), Some(0));
        assert_eq!(v(vec![], vec![], 7).storage_end(), Some(8));
        assert_eq!(v(vec![3], vec![u64::MAX], 0).storage_end(), None);
    }
}
