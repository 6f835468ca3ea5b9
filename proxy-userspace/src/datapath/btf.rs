//! Just enough of BTF (the kernel's type format) to tell whether a pinned
//! map's key and value are laid out as the programs' are.
//!
//! Sizes alone cannot tell `{ u32 addr; u16 port; u16 slot }` from
//! `{ u16 port; u16 slot; u32 addr }`, and a map adopted with fields in other
//! places sends traffic to the wrong backend. Our maps are BTF maps, so the
//! kernel keeps the key and value types of every map the agent created; a
//! type is reduced here to a canonical [`Layout`] (its name and size, and
//! each member's path, offset and type, typedefs and qualifiers followed)
//! and two layouts are compared member by member.
//!
//! aya-obj parses BTF too, but keeps its type table to itself. The format
//! (Documentation/bpf/btf.rst) is a header, a table of types numbered from 1
//! (0 is void) and a string section; this reader checks every offset and
//! length it reads, since a pinned map's BTF came from whoever made the map.

use std::fmt;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// How far a chain of typedefs, arrays or nested structs is followed. The
/// kernel refuses cycles, but our own object's BTF is not checked by it.
const MAX_DEPTH: usize = 32;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

const INT_SIGNED: u32 = 1;
const INT_BOOL: u32 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("the BTF is truncated: {what} runs past its end")]
    Truncated { what: &'static str },
    #[error("not BTF (magic {magic:#06x})")]
    Magic { magic: u16 },
    #[error("type {id} has kind {kind}, which this agent does not know")]
    UnknownKind { id: u32, kind: u32 },
    #[error("type {id} is not in the BTF")]
    NoType { id: u32 },
    #[error("a string at offset {offset} is not in the BTF's string section")]
    NoString { offset: u32 },
    #[error("type {id} nests deeper than {MAX_DEPTH} levels")]
    TooDeep { id: u32 },
}

/// A parsed BTF blob: its types, by id, and its strings.
#[derive(Debug)]
pub struct Btf {
    /// Index 0 is type id 1.
    types: Vec<Type>,
    strings: Vec<u8>,
}

#[derive(Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// The size for sized kinds, the referred type for the others.
    size_or_ref: u32,
    extra: Extra,
}

#[derive(Debug)]
enum Extra {
    None,
    Int { encoding: u32, bits: u32 },
    Array { elem: u32, len: u32 },
    Members(Vec<Member>),
}

#[derive(Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    offset: u32,
}

/// Reads native-endian u32s out of a byte slice, never past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u32(&mut self, what: &'static str) -> Result<u32, BtfError> {
        let end = self.at.checked_add(4).ok_or(BtfError::Truncated { what })?;
        let bytes = self
            .bytes
            .get(self.at..end)
            .ok_or(BtfError::Truncated { what })?;
        self.at = end;
        Ok(u32::from_ne_bytes(
            bytes.try_into().map_err(|_| BtfError::Truncated { what })?,
        ))
    }

    fn skip(&mut self, words: u32, each: usize, what: &'static str) -> Result<(), BtfError> {
        let len = (words as usize)
            .checked_mul(each)
            .and_then(|len| self.at.checked_add(len))
            .filter(|&end| end <= self.bytes.len())
            .ok_or(BtfError::Truncated { what })?;
        self.at = len;
        Ok(())
    }
}

fn section<'a>(
    bytes: &'a [u8],
    start: usize,
    off: u32,
    len: u32,
    what: &'static str,
) -> Result<&'a [u8], BtfError> {
    let from = start
        .checked_add(off as usize)
        .ok_or(BtfError::Truncated { what })?;
    let to = from
        .checked_add(len as usize)
        .ok_or(BtfError::Truncated { what })?;
    bytes.get(from..to).ok_or(BtfError::Truncated { what })
}

impl Btf {
    /// Parses a BTF blob in this machine's byte order, as the kernel hands
    /// it out and as our eBPF object (bpfel, on little-endian hosts) holds it.
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or(BtfError::Truncated { what: "the header" })?;
        let magic = u16::from_ne_bytes([header[0], header[1]]);
        if magic != MAGIC {
            return Err(BtfError::Magic { magic });
        }
        let mut reader = Reader {
            bytes: header,
            at: 4,
        };
        let hdr_len = reader.u32("the header")? as usize;
        let type_off = reader.u32("the header")?;
        let type_len = reader.u32("the header")?;
        let str_off = reader.u32("the header")?;
        let str_len = reader.u32("the header")?;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Truncated { what: "the header" });
        }
        let type_bytes = section(bytes, hdr_len, type_off, type_len, "the type section")?;
        let strings = section(bytes, hdr_len, str_off, str_len, "the string section")?.to_vec();
        let mut types = Vec::new();
        let mut reader = Reader {
            bytes: type_bytes,
            at: 0,
        };
        while reader.at < type_bytes.len() {
            let id = u32::try_from(types.len() + 1).unwrap_or(u32::MAX);
            types.push(read_type(&mut reader, id)?);
        }
        Ok(Self { types, strings })
    }

    fn get(&self, id: u32) -> Result<&Type, BtfError> {
        id.checked_sub(1)
            .and_then(|index| self.types.get(index as usize))
            .ok_or(BtfError::NoType { id })
    }

    fn name(&self, offset: u32) -> Result<&str, BtfError> {
        let rest = self
            .strings
            .get(offset as usize..)
            .ok_or(BtfError::NoString { offset })?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::NoString { offset })?;
        std::str::from_utf8(&rest[..end]).map_err(|_| BtfError::NoString { offset })
    }

    /// Follows typedefs and qualifiers, which do not change the bytes.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_ref;
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep { id })
    }

    fn size(&self, id: u32, depth: usize) -> Result<u64, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let id = self.resolve(id)?;
        if id == 0 {
            return Ok(0);
        }
        let ty = self.get(id)?;
        Ok(match (&ty.extra, ty.kind) {
            (Extra::Array { elem, len }, _) => {
                self.size(*elem, depth + 1)?.saturating_mul(u64::from(*len))
            }
            (_, KIND_PTR) => 8,
            (
                _,
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT
                | KIND_DATASEC,
            ) => u64::from(ty.size_or_ref),
            _ => 0,
        })
    }

    /// How a type is named in a layout: Rust's names for integers, since
    /// our maps are Rust types, and the BTF name for the rest.
    fn describe(&self, id: u32, depth: usize) -> Result<String, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let id = self.resolve(id)?;
        if id == 0 {
            return Ok("void".to_owned());
        }
        let ty = self.get(id)?;
        let name = self.name(ty.name_off)?;
        let name = if name.is_empty() { "(anon)" } else { name };
        Ok(match (&ty.extra, ty.kind) {
            (Extra::Int { encoding, bits }, _) => {
                if encoding & INT_BOOL != 0 {
                    "bool".to_owned()
                } else if encoding & INT_SIGNED != 0 {
                    format!("i{bits}")
                } else {
                    format!("u{bits}")
                }
            }
            (Extra::Array { elem, len }, _) => {
                format!("[{}; {len}]", self.describe(*elem, depth + 1)?)
            }
            (_, KIND_PTR) => "a pointer".to_owned(),
            (_, KIND_STRUCT) => format!("struct {name} ({} bytes)", ty.size_or_ref),
            (_, KIND_UNION) => format!("union {name} ({} bytes)", ty.size_or_ref),
            (_, KIND_ENUM | KIND_ENUM64) => format!("enum {name} ({} bytes)", ty.size_or_ref),
            (_, KIND_FLOAT) => format!("f{}", u64::from(ty.size_or_ref) * 8),
            (_, KIND_FWD) => format!("forward declaration {name}"),
            (_, kind) => format!("BTF kind {kind} {name}"),
        })
    }

    /// The canonical layout of type `id`: what a map's key or value is.
    pub fn layout(&self, id: u32) -> Result<Layout, BtfError> {
        let resolved = self.resolve(id)?;
        let mut fields = Vec::new();
        if resolved != 0 && matches!(self.get(resolved)?.kind, KIND_STRUCT | KIND_UNION) {
            self.flatten(resolved, "", 0, 0, &mut fields)?;
        }
        Ok(Layout {
            name: self.describe(resolved, 0)?,
            size: self.size(resolved, 0)?,
            fields,
        })
    }

    /// Lists the members of a struct or union, and those of the structs
    /// and unions inside it, by their dotted path and absolute offset.
    fn flatten(
        &self,
        id: u32,
        prefix: &str,
        base_bits: u64,
        depth: usize,
        out: &mut Vec<Field>,
    ) -> Result<(), BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let ty = self.get(id)?;
        let Extra::Members(members) = &ty.extra else {
            return Ok(());
        };
        for member in members {
            let name = self.name(member.name_off)?;
            // An anonymous struct or union lends its members to the parent.
            let path = match (prefix.is_empty(), name.is_empty()) {
                (_, true) => prefix.to_owned(),
                (true, false) => name.to_owned(),
                (false, false) => format!("{prefix}.{name}"),
            };
            // With kind_flag, the top 8 bits are a bitfield's width.
            let (offset, bits) = if ty.kind_flag {
                (member.offset & 0x00ff_ffff, member.offset >> 24)
            } else {
                (member.offset, 0)
            };
            let offset_bits = base_bits.saturating_add(u64::from(offset));
            let member_type = self.resolve(member.type_id)?;
            if bits == 0
                && member_type != 0
                && matches!(self.get(member_type)?.kind, KIND_STRUCT | KIND_UNION)
            {
                self.flatten(member_type, &path, offset_bits, depth + 1, out)?;
            } else {
                let mut type_name = self.describe(member_type, depth + 1)?;
                if bits != 0 {
                    type_name = format!("{type_name}:{bits}");
                }
                out.push(Field {
                    path,
                    offset_bits,
                    type_name,
                });
            }
        }
        Ok(())
    }
}

fn read_type(reader: &mut Reader<'_>, id: u32) -> Result<Type, BtfError> {
    let what = "a type";
    let name_off = reader.u32(what)?;
    let info = reader.u32(what)?;
    let size_or_ref = reader.u32(what)?;
    let vlen = info & 0xffff;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 == 1;
    let extra = match kind {
        KIND_INT => {
            let data = reader.u32(what)?;
            Extra::Int {
                encoding: data >> 24,
                bits: data & 0xff,
            }
        }
        KIND_ARRAY => {
            let elem = reader.u32(what)?;
            let _index_type = reader.u32(what)?;
            let len = reader.u32(what)?;
            Extra::Array { elem, len }
        }
        KIND_STRUCT | KIND_UNION => {
            // Each member is three u32s: checking the room first keeps a
            // hostile vlen from reserving memory the blob cannot back.
            let start = reader.at;
            reader.skip(vlen, 12, what)?;
            reader.at = start;
            let mut members = Vec::with_capacity(vlen as usize);
            for _ in 0..vlen {
                members.push(Member {
                    name_off: reader.u32(what)?,
                    type_id: reader.u32(what)?,
                    offset: reader.u32(what)?,
                });
            }
            Extra::Members(members)
        }
        KIND_ENUM | KIND_FUNC_PROTO => {
            reader.skip(vlen, 8, what)?;
            Extra::None
        }
        KIND_VAR | KIND_DECL_TAG => {
            reader.skip(1, 4, what)?;
            Extra::None
        }
        KIND_DATASEC | KIND_ENUM64 => {
            reader.skip(vlen, 12, what)?;
            Extra::None
        }
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => Extra::None,
        _ => return Err(BtfError::UnknownKind { id, kind }),
    };
    Ok(Type {
        name_off,
        kind,
        kind_flag,
        size_or_ref,
        extra,
    })
}

/// What a map's key or value is, as far as reading its bytes goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `struct ServiceKey (12 bytes)`, `u32`, ...
    pub name: String,
    pub size: u64,
    /// The members, nested ones by dotted path; empty for a scalar.
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub path: String,
    pub offset_bits: u64,
    /// `u16`, `[u8; 2]`, `u8:3` for a bitfield, ...
    pub type_name: String,
}

struct Offset(u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(8) {
            write!(f, "offset {}", self.0 / 8)
        } else {
            write!(f, "bit offset {}", self.0)
        }
    }
}

impl Layout {
    /// How `self` (found in a pinned map) differs from `expected` (the
    /// programs'), in words, `what` being "key" or "value"; `None` when the
    /// two read the same bytes the same way.
    #[must_use]
    pub fn differences(&self, expected: &Self, what: &str) -> Option<String> {
        let mut out = Vec::new();
        if self.name != expected.name || self.size != expected.size {
            out.push(format!(
                "{what} is {}, expected {}",
                self.name, expected.name
            ));
        }
        for want in &expected.fields {
            let Some(have) = self.fields.iter().find(|f| f.path == want.path) else {
                out.push(format!(
                    "{what} has no member `{}`, expected {} at {}",
                    want.path,
                    want.type_name,
                    Offset(want.offset_bits)
                ));
                continue;
            };
            if have.offset_bits != want.offset_bits {
                out.push(format!(
                    "{what} member `{}` is at {}, expected {}",
                    want.path,
                    Offset(have.offset_bits),
                    Offset(want.offset_bits)
                ));
            } else if have.type_name != want.type_name {
                out.push(format!(
                    "{what} member `{}` at {} is {}, expected {}",
                    want.path,
                    Offset(want.offset_bits),
                    have.type_name,
                    want.type_name
                ));
            }
        }
        for extra in &self.fields {
            if !expected.fields.iter().any(|f| f.path == extra.path) {
                out.push(format!(
                    "{what} member `{}` ({} at {}) is not in this agent's {}",
                    extra.path,
                    extra.type_name,
                    Offset(extra.offset_bits),
                    expected.name
                ));
            }
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

#[cfg(test)]
mod tests;
