//! The one safetensors reader: the crate's validation with this project's messages on top,
//! and never a panic on any bytes.

use std::path::Path;

use mmrec_schemas::safetensors::parse;

/// A file of the header JSON `header` followed by `data` zero bytes.
fn file(header: &[u8], data: usize) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.resize(f.len() + data, 0);
    f
}

#[test]
fn malformed_headers_are_refused_with_the_tensor_and_bytes_at_fault() {
    // Overlapping tensors and offsets out of range, in a hand-written header.
    let overlap = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let err = parse(Path::new("x"), &file(overlap, 12)).unwrap_err().to_string();
    assert!(err.contains("overlap"), "{err}");
    let wrong_size = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    assert!(parse(Path::new("x"), &file(wrong_size, 100 - 8 - wrong_size.len()))
        .unwrap_err()
        .to_string()
        .contains("needs 12 bytes"));
    // A repeated key would let a forged file replace a tensor; bytes nothing claims are
    // refused as the safetensors crate refuses them.
    let twice = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let err = parse(Path::new("x"), &file(twice, 8)).unwrap_err().to_string();
    assert!(err.contains("`a` appears twice"), "{err}");
    let one = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    assert!(parse(Path::new("x"), &file(one, 4)).is_ok());
    let err = parse(Path::new("x"), &file(one, 9)).unwrap_err().to_string();
    assert!(err.contains("5 trailing bytes"), "{err}");
    let gap = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert!(parse(Path::new("x"), &file(gap, 8))
        .unwrap_err()
        .to_string()
        .contains("unclaimed"));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(Path::new("fuzz"), &bytes);
        }

        #[test]
        fn mutated_valid_headers_never_panic(pos in 0usize..120, byte in any::<u8>(), extra in 0u64..64) {
            let mut h = br#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"__metadata__":{"format":"mmrec"}}"#.to_vec();
            let p = pos % h.len();
            h[p] = byte;
            let _ = parse(Path::new("fuzz"), &file(&h, extra as usize));
        }
    }
}
