use xtask::btf_map::BtfBuilder;

use super::*;
use proxy_common::MAPS;

use crate::datapath::EBPF_OBJECT;

/// The integers Rust emits, then a key like ours with `port` of the given
/// type; returns the blob and the key's id.
fn key_with_port(port_bits: u32) -> (Vec<u8>, u32) {
    let mut b = BtfBuilder::new();
    let u8_ = b.int("u8", 1, false);
    let u16_ = b.int("u16", 2, false);
    let u32_ = b.int("u32", 4, false);
    let pad = b.array(u8_, u32_, 2);
    let port = if port_bits == 16 { u16_ } else { u32_ };
    let key = b.structure(
        "Key",
        12,
        &[
            ("addr_be", u32_, 0),
            ("port_be", port, 32),
            ("proto", u8_, 64),
            ("scope", u8_, 72),
            ("pad", pad, 80),
        ],
    );
    (b.bytes(), key)
}

fn layout(bytes: &[u8], id: u32) -> Layout {
    Btf::parse(bytes).unwrap().layout(id).unwrap()
}

#[test]
fn a_struct_is_described_by_its_members() {
    let (bytes, key) = key_with_port(16);
    let key = layout(&bytes, key);
    assert_eq!(key.name, "struct Key (12 bytes)");
    assert_eq!(key.size, 12);
    let fields: Vec<(&str, u64, &str)> = key
        .fields
        .iter()
        .map(|f| (f.path.as_str(), f.offset_bits, f.type_name.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("addr_be", 0, "u32"),
            ("port_be", 32, "u16"),
            ("proto", 64, "u8"),
            ("scope", 72, "u8"),
            ("pad", 80, "[u8; 2]"),
        ]
    );
    assert_eq!(key.differences(&key, "key"), None);
}

#[test]
fn a_member_of_another_type_is_named_with_its_offset() {
    let (bytes, id) = key_with_port(16);
    let ours = layout(&bytes, id);
    let (bytes, id) = key_with_port(32);
    let theirs = layout(&bytes, id);
    assert_eq!(
        theirs.differences(&ours, "key").as_deref(),
        Some("key member `port_be` at offset 4 is u32, expected u16")
    );
}

#[test]
fn swapped_members_are_found_though_the_sizes_agree() {
    let mut b = BtfBuilder::new();
    let u16_ = b.int("u16", 2, false);
    let u32_ = b.int("u32", 4, false);
    let ours = b.structure(
        "V",
        8,
        &[("id", u32_, 0), ("count", u16_, 32), ("flags", u16_, 48)],
    );
    let theirs = b.structure(
        "V",
        8,
        &[("id", u32_, 0), ("flags", u16_, 32), ("count", u16_, 48)],
    );
    let btf = Btf::parse(&b.bytes()).unwrap();
    assert_eq!(
        btf.layout(theirs)
            .unwrap()
            .differences(&btf.layout(ours).unwrap(), "value")
            .as_deref(),
        Some(
            "value member `count` is at offset 6, expected offset 4; \
             value member `flags` is at offset 4, expected offset 6"
        )
    );
}

#[test]
fn typedefs_are_followed_and_names_nested_structs_flattened() {
    let mut b = BtfBuilder::new();
    let u16_ = b.int("u16", 2, false);
    let u32_ = b.int("u32", 4, false);
    let be16 = b.typedef("__be16", u16_);
    let be16_again = b.typedef("port_t", be16);
    let addr = b.structure("Addr", 8, &[("ip", u32_, 0), ("port", u16_, 32)]);
    let addr_typedef = b.typedef("addr_t", addr);
    let plain = b.structure("Outer", 12, &[("a", addr, 0), ("x", u16_, 64)]);
    let wrapped = b.structure(
        "Outer",
        12,
        &[("a", addr_typedef, 0), ("x", be16_again, 64)],
    );
    let key_alias = b.typedef("Key", wrapped);
    let btf = Btf::parse(&b.bytes()).unwrap();
    let plain = btf.layout(plain).unwrap();
    let paths: Vec<&str> = plain.fields.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a.ip", "a.port", "x"]);
    assert_eq!(btf.layout(key_alias).unwrap(), plain);
}

#[test]
fn missing_extra_and_renamed_are_all_told() {
    let mut b = BtfBuilder::new();
    let u8_ = b.int("u8", 1, false);
    let u32_ = b.int("u32", 4, false);
    let ours = b.structure("S", 8, &[("a", u32_, 0), ("b", u8_, 32)]);
    let theirs = b.structure("T", 8, &[("a", u32_, 0), ("c", u8_, 40)]);
    let btf = Btf::parse(&b.bytes()).unwrap();
    let message = btf
        .layout(theirs)
        .unwrap()
        .differences(&btf.layout(ours).unwrap(), "key")
        .unwrap();
    assert_eq!(
        message,
        "key is struct T (8 bytes), expected struct S (8 bytes); \
         key has no member `b`, expected u8 at offset 4; \
         key member `c` (u8 at offset 5) is not in this agent's struct S (8 bytes)"
    );
}

#[test]
fn scalars_compare_by_kind_and_width() {
    let mut b = BtfBuilder::new();
    let u32_ = b.int("u32", 4, false);
    let i32_ = b.int("i32", 4, true);
    let u32_alias = b.typedef("__u32", u32_);
    let btf = Btf::parse(&b.bytes()).unwrap();
    let u32_ = btf.layout(u32_).unwrap();
    assert_eq!(
        btf.layout(u32_alias).unwrap().differences(&u32_, "key"),
        None
    );
    assert_eq!(
        btf.layout(i32_)
            .unwrap()
            .differences(&u32_, "key")
            .as_deref(),
        Some("key is i32, expected u32")
    );
}

/// Every map of our own object is described, and its description is as
/// large as the map's key and value: the reader reads real BTF right.
#[test]
fn our_objects_maps_are_described_at_their_sizes() {
    let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
    let btf = Btf::parse(&object.btf.as_ref().unwrap().to_bytes()).unwrap();
    for name in MAPS {
        let aya_obj::Map::Btf(map) = &object.maps[name] else {
            panic!("{name} is not a BTF map");
        };
        let key = btf.layout(map.def.btf_key_type_id).unwrap();
        let value = btf.layout(map.def.btf_value_type_id).unwrap();
        assert_eq!(key.size, u64::from(object.maps[name].key_size()), "{name}");
        assert_eq!(
            value.size,
            u64::from(object.maps[name].value_size()),
            "{name}"
        );
        for field in key.fields.iter().chain(&value.fields) {
            assert!(
                !field.type_name.starts_with("BTF kind"),
                "{name}: {field:?}"
            );
        }
        assert_eq!(key.differences(&key, "key"), None);
    }
}

#[test]
fn broken_btf_is_an_error_never_a_panic() {
    let (good, key) = key_with_port(16);
    // Every truncation of a good blob.
    for len in 0..good.len() {
        let _ = Btf::parse(&good[..len]).and_then(|btf| btf.layout(key));
    }
    assert_eq!(
        Btf::parse(&[0; 24]).unwrap_err(),
        BtfError::Magic { magic: 0 }
    );

    // A struct claiming 65,535 members with none behind them.
    let mut b = BtfBuilder::new();
    b.raw("S", &[(4 << 24) | 0xffff, 8]);
    assert_eq!(
        Btf::parse(&b.bytes()).unwrap_err(),
        BtfError::Truncated { what: "a type" }
    );

    // A kind from the future.
    let mut b = BtfBuilder::new();
    b.raw("X", &[30 << 24, 0]);
    assert_eq!(
        Btf::parse(&b.bytes()).unwrap_err(),
        BtfError::UnknownKind { id: 1, kind: 30 }
    );

    // A typedef of itself, and a member of a type that is not there.
    let mut b = BtfBuilder::new();
    let looped = b.raw("loop", &[8 << 24, 1]);
    let dangling = b.structure("D", 4, &[("m", 99, 0)]);
    let btf = Btf::parse(&b.bytes()).unwrap();
    assert!(matches!(btf.layout(looped), Err(BtfError::TooDeep { .. })));
    assert_eq!(btf.layout(dangling), Err(BtfError::NoType { id: 99 }));
    assert_eq!(btf.layout(1000), Err(BtfError::NoType { id: 1000 }));

    // A name past the string section (the first type starts right after
    // the 24-byte header, with its name offset).
    let mut b = BtfBuilder::new();
    let named = b.structure("N", 0, &[]);
    let mut bytes = b.bytes();
    bytes[24..28].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert_eq!(
        Btf::parse(&bytes).unwrap().layout(named),
        Err(BtfError::NoString { offset: u32::MAX })
    );
}
