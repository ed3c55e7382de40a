//! The bounded `.bin` reader (torch_pickle) against PyTorch: the tensors torch.save wrote, exactly,
//! and a one-line error naming the file for each crafted file of issue 22. Fixtures:
//! `scripts/make_hostile_bin_fixtures.py tests/fixtures`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ddpm_unet::load::read_weights;
use ddpm_unet::torch_pickle::read_state_dict;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// The keys in the order the script inserts them into the state dict.
const PARITY_KEYS: [&str; 15] = [
    "0.weight",
    "0.bias",
    "1.weight",
    "1.bias",
    "half",
    "bf16",
    "f64",
    "long",
    "base",
    "transposed",
    "slice",
    "scalar",
    "empty",
    "param",
    "permuted_half",
];

/// Every value as f64 (exact for f16, bf16, f32 and these small integers).
fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn check_parity(file: &str) {
    let ours = read_state_dict(fixture(file)).unwrap();
    let names: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, PARITY_KEYS, "{file}");
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("torch-bin/parity.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(reference.len(), ours.len());
    for (key, t) in &ours {
        let r = &reference[key];
        assert_eq!(t.dtype(), r.dtype(), "{file} {key}");
        assert_eq!(t.dims(), r.dims(), "{file} {key}");
        assert_eq!(values(t), values(r), "{file} {key}");
    }
    // the views really are views in the file: the transpose's values are the base's, transposed
    let get = |k: &str| ours.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(
        values(&get("transposed")),
        values(&get("base").t().unwrap())
    );
    assert_eq!(get("slice").dims(), &[2, 3]);
    assert_eq!(get("permuted_half").dims(), &[4, 2, 3]);
    assert_eq!(values(&get("long")), vec![-11.0, -4.0, 3.0, 10.0, 17.0]);
    assert_eq!(values(&get("scalar")), vec![3.5]);
}

#[test]
fn reads_exactly_what_torch_saved() {
    check_parity("torch-bin/parity.bin");
}

#[test]
fn reads_pickle_protocol_4() {
    check_parity("torch-bin/parity-proto4.bin");
}

/// Each crafted file with a phrase its error must contain.
const HOSTILE: [(&str, &str); 10] = [
    ("rebuild-no-args.bin", "_rebuild_tensor_v2 needs (storage"),
    (
        "huge-tensor.bin",
        "tensor `w`: storage `0` declares 10000000000 F32 elements (40000000000 bytes) but entry `archive/data/0` holds 4 bytes",
    ),
    ("memo-bomb.bin", "entry `w` is a tuple, not a tensor"),
    ("deep-nesting.bin", "values nest deeper than 32 levels"),
    ("os-system.bin", "global `posix.system` is not allowed"),
    ("truncated.bin", "not a torch.save zip archive"),
    ("wrong-entry-size.bin", "tensor `w`: storage `0` declares 16 F32 elements (64 bytes) but entry"),
    ("view-out-of-bounds.bin", "tensor `w`: view (offset 1, size [2, 2], stride [2, 1]) reaches element 4 of a storage of 4"),
    ("broadcast-bomb.bin", "tensor `w`: the tensors would take more than 4 times the file's size"),
    ("compressed.bin", "is compressed"),
];

#[test]
fn crafted_files_give_one_line_errors_naming_the_file() {
    for (file, phrase) in HOSTILE {
        let path = fixture("hostile").join(file);
        assert!(path.is_file(), "{}", path.display());
        for msg in [
            read_state_dict(&path).map(|_| ()).unwrap_err().to_string(),
            read_weights(&path, &Device::Cpu, DType::F32)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
        ] {
            eprintln!("{msg}");
            assert!(!msg.contains('\n'), "{file}: {msg}");
            assert!(msg.contains(&*path.to_string_lossy()), "{file}: {msg}");
            assert!(msg.contains(phrase), "{file}: {msg}");
        }
    }
}

#[test]
fn legacy_fixture_still_loads_through_the_new_reader() {
    // written by diffusers' save_pretrained and re-saved with torch.save (scripts/make_fixtures.py)
    let path = fixture("diffusers/unet-cifar10-layout-legacy-bin/diffusion_pytorch_model.bin");
    let sd = read_state_dict(&path).unwrap();
    let safetensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("diffusers/unet-cifar10-layout/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // the same architecture: as many tensors, with the legacy attention names
    assert_eq!(sd.len(), safetensors.len());
    assert!(sd
        .iter()
        .any(|(k, _)| k.ends_with("attentions.0.query.weight")));
    assert!(sd.iter().all(|(_, t)| t.dtype() == DType::F32));
}
