//! Field offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The sk_msg program reads a few `struct tcp_sock` fields whose offsets depend on how the kernel
//! was built. The loader looks them up here and hands them to the program as load-time constants
//! (what CO-RE relocations do for C programs). Only what that needs is read: type records, member
//! names and offsets, sizes. Anonymous struct and union members are searched through, so a path
//! names fields as C code would (`sk_backlog.rmem_alloc`, not the anonymous unions around them).
use std::path::Path;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data: {0}")]
    Format(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("{ty} has no member {member}")]
    NoMember { ty: String, member: String },
    #[error("{0} is a bitfield, not an addressable field")]
    Bitfield(String),
    #[error("{0} is not a struct or union, so it has no members")]
    NotComposite(String),
    #[error("BTF has no enum with a value {0}")]
    NoEnumValue(String),
}

/// Where a field sits in its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Bytes from the start of the struct.
    pub offset: u32,
    /// The field's size in bytes.
    pub size: u32,
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Where the bytes come from: a mapped file (the kernel's, 5 MB; kept out of the heap) or memory.
enum Data {
    Mapped(crate::sys::MappedFile),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m.bytes(),
            Data::Owned(v) => v,
        }
    }
}

/// Parsed BTF: the raw bytes and where each type record starts (type ids start at 1).
pub struct Btf {
    data: Data,
    types: Vec<u32>,
    strings: usize,
    strings_len: usize,
}

impl Btf {
    /// Maps the file where the kernel allows it (6.18 does); where it does not (6.1 and 6.12
    /// answer ENODEV), reads it.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let read_err = |source| BtfError::Read {
            path: path.display().to_string(),
            source,
        };
        match crate::sys::MappedFile::open(path) {
            Ok(data) => Self::from_data(Data::Mapped(data)),
            Err(_) => Self::parse(std::fs::read(path).map_err(read_err)?),
        }
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        Self::from_data(Data::Owned(data))
    }

    fn from_data(data: Data) -> Result<Self, BtfError> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Format("bad magic (or a big-endian kernel)"));
        }
        let word = |o: usize| read_u32(&data, o).ok_or(BtfError::Format("truncated header"));
        let hdr_len = word(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Format("header too short"));
        }
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off;
        if types_end > data.len()
            || strings + str_len > data.len()
            || data.len() > u32::MAX as usize
        {
            return Err(BtfError::Format("sections run past the end"));
        }
        let mut types = Vec::new();
        let mut o = types_start;
        while o < types_end {
            types.push(o as u32);
            let info = read_u32(&data, o + 4).ok_or(BtfError::Format("truncated type"))?;
            o += 12 + extra_len(kind(info), vlen(info))?;
        }
        if o != types_end {
            return Err(BtfError::Format("type section does not end on a record"));
        }
        Ok(Self {
            data,
            types,
            strings,
            strings_len: str_len,
        })
    }

    /// The offset and size of `path` (member names, outermost first) in `struct name`.
    pub fn field(&self, name: &str, path: &[&str]) -> Result<Field, BtfError> {
        let mut ty = self
            .find_struct(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        let mut at = name.to_string();
        let mut offset = 0;
        for member in path {
            let (bit_offset, member_ty) =
                self.member(ty, member)?.ok_or_else(|| BtfError::NoMember {
                    ty: at.clone(),
                    member: member.to_string(),
                })?;
            at = format!("{at}.{member}");
            if bit_offset % 8 != 0 {
                return Err(BtfError::Bitfield(at));
            }
            offset += bit_offset / 8;
            ty = self.resolve(member_ty);
        }
        Ok(Field {
            offset,
            size: self.size_of(ty),
        })
    }

    /// The value of enumerator `name` (`SOCK_ZEROCOPY` of `enum sock_flags`, say), in whichever
    /// enum of the kernel declares it.
    pub fn enum_value(&self, name: &str) -> Result<i64, BtfError> {
        for id in 1..=self.types.len() as u32 {
            let (_, info, _) = self.header(id);
            let (k, n) = (kind(info), vlen(info) as usize);
            let base = self.types[id as usize - 1] as usize + 12;
            let stride = match k {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => continue,
            };
            for i in 0..n {
                let e = base + i * stride;
                if self.name(self.u32(e)) != Some(name) {
                    continue;
                }
                let lo = self.u32(e + 4);
                return Ok(if k == KIND_ENUM {
                    i64::from(lo as i32)
                } else {
                    (u64::from(self.u32(e + 8)) << 32 | u64::from(lo)) as i64
                });
            }
        }
        Err(BtfError::NoEnumValue(name.to_string()))
    }

    pub(crate) fn find_struct(&self, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|id| {
            let (n, info, _) = self.header(*id);
            kind(info) == KIND_STRUCT && self.name(n) == Some(name)
        })
    }

    /// A named member of a struct or union, searching anonymous members through: its bit offset
    /// from the start of `ty` and its type.
    fn member(&self, ty: u32, name: &str) -> Result<Option<(u32, u32)>, BtfError> {
        let (_, info, _) = self.header(ty);
        if !matches!(kind(info), KIND_STRUCT | KIND_UNION) {
            return Err(BtfError::NotComposite(name.to_string()));
        }
        let base = self.types[ty as usize - 1] as usize + 12;
        for i in 0..vlen(info) as usize {
            let m = base + i * 12;
            let (m_name, m_ty, m_off) = (self.u32(m), self.u32(m + 4), self.u32(m + 8));
            // With kind_flag set, the top 8 bits hold a bitfield size.
            let bit_offset = if info >> 31 == 1 {
                m_off & 0x00ff_ffff
            } else {
                m_off
            };
            match self.name(m_name) {
                Some(n) if n == name => return Ok(Some((bit_offset, m_ty))),
                None | Some("") => {
                    let inner = self.resolve(m_ty);
                    let (_, inner_info, _) = self.header(inner);
                    if matches!(kind(inner_info), KIND_STRUCT | KIND_UNION)
                        && let Some((off, t)) = self.member(inner, name)?
                    {
                        return Ok(Some((bit_offset + off, t)));
                    }
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut ty: u32) -> u32 {
        // Bounded: a malformed chain must not loop forever.
        for _ in 0..32 {
            if ty == 0 || ty as usize > self.types.len() {
                return 0;
            }
            let (_, info, target) = self.header(ty);
            match kind(info) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    ty = target
                }
                _ => return ty,
            }
        }
        0
    }

    pub(crate) fn size_of(&self, ty: u32) -> u32 {
        if ty == 0 {
            return 0;
        }
        let (_, info, size) = self.header(ty);
        match kind(info) {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => size,
            KIND_PTR => 8,
            KIND_ARRAY => {
                let a = self.types[ty as usize - 1] as usize + 12;
                self.size_of(self.resolve(self.u32(a))) * self.u32(a + 8)
            }
            _ => 0,
        }
    }

    /// `(name_off, info, size_or_type)` of a type id (1-based; checked by callers).
    fn header(&self, id: u32) -> (u32, u32, u32) {
        let o = self.types[id as usize - 1] as usize;
        (self.u32(o), self.u32(o + 4), self.u32(o + 8))
    }

    fn u32(&self, o: usize) -> u32 {
        // Every record was bounds-checked while indexing.
        read_u32(&self.data, o).unwrap_or(0)
    }

    fn name(&self, off: u32) -> Option<&str> {
        if off as usize >= self.strings_len {
            return None;
        }
        let start = self.strings + off as usize;
        let end = self.data[start..self.strings + self.strings_len]
            .iter()
            .position(|b| *b == 0)?;
        std::str::from_utf8(&self.data[start..start + end]).ok()
    }
}

fn read_u32(data: &[u8], o: usize) -> Option<u32> {
    data.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn kind(info: u32) -> u32 {
    (info >> 24) & 0x1f
}

fn vlen(info: u32) -> u32 {
    info & 0xffff
}

/// Bytes that follow a type's 12-byte header, by kind.
fn extra_len(kind: u32, vlen: u32) -> Result<usize, BtfError> {
    let vlen = vlen as usize;
    Ok(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | 7 /* fwd */ | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | 12 /* func */ | 16 /* float */ | KIND_TYPE_TAG => 0,
        _ => return Err(BtfError::Format("unknown type kind")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF from type records and a string table, the way the kernel lays it out.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn words(&mut self, w: &[u32]) {
            for x in w {
                self.types.extend_from_slice(&x.to_le_bytes());
            }
        }
        fn int(&mut self, name: &str, size: u32) {
            let n = self.s(name);
            self.words(&[n, KIND_INT << 24, size, size * 8]);
        }
        fn enumeration(&mut self, name: &str, values: &[(&str, i32)]) {
            let n = self.s(name);
            self.words(&[n, (KIND_ENUM << 24) | values.len() as u32, 4]);
            for (v, x) in values {
                let vn = self.s(v);
                self.words(&[vn, *x as u32]);
            }
        }
        fn typedef(&mut self, name: &str, target: u32) {
            let n = self.s(name);
            self.words(&[n, KIND_TYPEDEF << 24, target]);
        }
        /// Members: (name, type id, bit offset).
        fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let n = self.s(name);
            self.words(&[n, (kind << 24) | members.len() as u32, size]);
            for (m, ty, off) in members {
                let mn = self.s(m);
                self.words(&[mn, *ty, *off]);
            }
        }
        fn build(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature `tcp_sock`: [1] u32, [2] int, [3] atomic_t, [4] anonymous union,
    /// [5] sk_backlog struct, [6] sock, [7] typedef, [8] tcp_sock.
    fn sample() -> Btf {
        let mut b = Builder::new();
        b.int("u32", 4);
        b.int("int", 4);
        b.composite(KIND_STRUCT, "atomic_t", 4, &[("counter", 2, 0)]);
        b.composite(KIND_UNION, "", 4, &[("skc_hash", 1, 0), ("skc_u16", 1, 0)]);
        b.composite(KIND_STRUCT, "", 8, &[("rmem_alloc", 3, 0), ("len", 2, 32)]);
        b.composite(
            KIND_STRUCT,
            "sock",
            32,
            &[("", 4, 0), ("sk_backlog", 5, 64), ("sk_rcvbuf", 2, 192)],
        );
        b.typedef("sock_t", 6);
        b.composite(
            KIND_STRUCT,
            "tcp_sock",
            48,
            &[("sk", 7, 0), ("write_seq", 1, 256), ("copied_seq", 1, 320)],
        );
        Btf::parse(b.build()).unwrap()
    }

    #[test]
    fn fields_by_path_through_typedefs_and_anonymous_members() {
        let btf = sample();
        let cases: &[(&[&str], Field)] = &[
            (
                &["write_seq"],
                Field {
                    offset: 32,
                    size: 4,
                },
            ),
            (
                &["copied_seq"],
                Field {
                    offset: 40,
                    size: 4,
                },
            ),
            (
                &["sk", "sk_rcvbuf"],
                Field {
                    offset: 24,
                    size: 4,
                },
            ),
            (
                &["sk", "sk_backlog", "rmem_alloc"],
                Field { offset: 8, size: 4 },
            ),
            (
                &["sk", "sk_backlog", "len"],
                Field {
                    offset: 12,
                    size: 4,
                },
            ),
            // In an anonymous union: found without naming it.
            (&["sk", "skc_u16"], Field { offset: 0, size: 4 }),
        ];
        for (path, want) in cases {
            assert_eq!(btf.field("tcp_sock", path).unwrap(), *want, "{path:?}");
        }
    }

    #[test]
    fn enumerators_by_name() {
        let mut b = Builder::new();
        b.int("u32", 4);
        b.enumeration(
            "sock_flags",
            &[("SOCK_DEAD", 0), ("SOCK_ZEROCOPY", 18), ("NEG", -1)],
        );
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.enum_value("SOCK_ZEROCOPY").unwrap(), 18);
        assert_eq!(btf.enum_value("NEG").unwrap(), -1);
        assert!(matches!(
            btf.enum_value("SOCK_NOPE"),
            Err(BtfError::NoEnumValue(_))
        ));
    }

    #[test]
    fn missing_names_say_where_they_were_looked_for() {
        let btf = sample();
        let e = btf.field("tcp_sock", &["sk", "sk_sndbuf"]).unwrap_err();
        assert_eq!(e.to_string(), "tcp_sock.sk has no member sk_sndbuf");
        assert!(matches!(
            btf.field("udp_sock", &["x"]),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            btf.field("tcp_sock", &["write_seq", "x"]),
            Err(BtfError::NotComposite(_))
        ));
    }

    #[test]
    fn bad_data_is_refused() {
        assert!(matches!(
            Btf::parse(vec![1, 2, 3]),
            Err(BtfError::Format(_))
        ));
        let mut truncated = Builder::new();
        truncated.int("u32", 4);
        let mut data = truncated.build();
        // Claim a longer type section than there is.
        data[12] = 200;
        assert!(matches!(Btf::parse(data), Err(BtfError::Format(_))));
    }

    /// This kernel's own BTF, when it has one: paths through nested and anonymous members of
    /// `struct tcp_sock` resolve.
    #[test]
    fn nested_members_resolve_in_the_running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("skipped: no {}", path.display());
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let rcvbuf = btf
            .field("tcp_sock", &["inet_conn", "icsk_inet", "sk", "sk_rcvbuf"])
            .unwrap();
        assert_eq!(rcvbuf.size, 4);
        let dport = btf
            .field(
                "tcp_sock",
                &["inet_conn", "icsk_inet", "sk", "__sk_common", "skc_dport"],
            )
            .unwrap();
        assert_eq!(dport.size, 2);
    }
}
