//! The FID Inception-v3 (`ddpm_cli::inception`) against pytorch-fid's own network run by PyTorch.
//!
//! The fixture (`tests/fixtures/inception.safetensors`, written by `scripts/make_inception_fixture.py`)
//! holds input images, pytorch-fid's 2048-d features of them and `F.interpolate` resizes; the
//! network's weights are not stored but rebuilt here from the closed form the script documents
//! (FNV-1a of the tensor name, splitmix64 of the element index), bit for bit, for every tensor that
//! the fixture's `weights` metadata lists from PyTorch's state dict.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_cli::inception::{resize_bilinear, Inception, FEATURES};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/inception.safetensors");

/// max |a - b| / max |b|: the largest error relative to the reference's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d / s
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// [name, shape] of each float tensor of pytorch-fid's state dict, as the fixture lists them.
type WeightList = Vec<(String, Vec<usize>)>;

/// The fixture's tensors and its `weights` metadata.
fn fixture() -> (HashMap<String, Tensor>, WeightList) {
    let tensors = candle_core::safetensors::load(FIXTURE, &Device::Cpu).unwrap();
    let bytes = std::fs::read(FIXTURE).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &meta.metadata().as_ref().unwrap()["weights"];
    let weights: WeightList = serde_json::from_str(json).unwrap();
    (tensors, weights)
}

fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The script's closed-form tensor `name`: u_k = f32(splitmix64(seed + k) >> 40) / 2^23 - 1, then
/// scaled by the tensor's kind (see scripts/make_inception_fixture.py).
fn closed_form(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let seed = fnv1a64(name);
    let u = (0..n as u64).map(|k| (splitmix64(seed.wrapping_add(k)) >> 40) as f32 / 8_388_608.0 - 1.0);
    let v: Vec<f32> = if name.ends_with("conv.weight") {
        let fan_in: usize = shape[1..].iter().product();
        let scale = (6.0 / fan_in as f64).sqrt() as f32;
        u.map(|u| u * scale).collect()
    } else if name.ends_with("bn.weight") {
        u.map(|u| 1.0 + 0.25 * u).collect()
    } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") {
        u.map(|u| 0.1 * u).collect()
    } else if name.ends_with("bn.running_var") {
        u.map(|u| 1.0 + 0.5 * u).collect()
    } else if name.starts_with("fc.") {
        u.map(|u| 0.01 * u).collect()
    } else {
        panic!("no closed form for {name}")
    };
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// All of the state dict's float tensors, built once for the tests of this binary.
fn weights() -> &'static HashMap<String, Tensor> {
    static W: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    W.get_or_init(|| fixture().1.iter().map(|(name, shape)| (name.clone(), closed_form(name, shape))).collect())
}

#[test]
fn resize_matches_pytorch_interpolate() {
    let (t, _) = fixture();
    for case in ["up", "down", "mixed", "same", "gray28_to_299"] {
        let x = &t[&format!("resize.{case}.input")];
        let want = &t[&format!("resize.{case}.output")];
        let got = if case == "gray28_to_299" {
            // the fixture keeps rows and columns 0, 7, ..., 294 of the 299x299 output
            let y = resize_bilinear(x, 299, 299).unwrap();
            let idx = Tensor::arange_step(0u32, 299, 7, &Device::Cpu).unwrap();
            y.index_select(&idx, 2).unwrap().index_select(&idx, 3).unwrap()
        } else {
            let (_, _, h, w) = want.dims4().unwrap();
            resize_bilinear(x, h, w).unwrap()
        };
        assert_eq!(got.dims(), want.dims(), "{case}");
        // inputs in [0, 1]: a few f32 roundings at most
        let d = max_abs_diff(&got, want);
        println!("resize {case}: max |diff| {d:e}");
        assert!(d <= 1e-6, "resize {case}: max |diff| {d:e}");
    }
}

#[test]
fn features_match_pytorch_fid() {
    let (t, _) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(weights(), &path).unwrap();
    let start = Instant::now();
    let net = Inception::load(&path, &Device::Cpu).unwrap();
    println!("load and fold: {:.2} s", start.elapsed().as_secs_f64());
    let mut outputs = HashMap::new();
    for case in ["gray28", "rgb32", "rgb20x37"] {
        let x = &t[&format!("features.{case}.input")];
        let want = &t[&format!("features.{case}.output")];
        let start = Instant::now();
        let got = net.features(x).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(got.dims(), &[x.dim(0).unwrap(), FEATURES], "{case}");
        let e = rel_err(&got, want);
        println!("features {case} {:?}: max |diff| / max |ref| {e:e}, {secs:.2} s", x.dims());
        // f32 through 94 convolutions, summed in another order than PyTorch's: ~4e-7 measured
        assert!(e <= 3e-6, "features {case}: relative error {e:e}");
        outputs.insert(case, got);
    }
    // the part of the features that depends on the image: the difference between the two images of
    // a batch (a random network's features are dominated by what all images share)
    let x = &t["features.rgb32.input"];
    let want = &t["features.rgb32.output"];
    let got = &outputs["rgb32"];
    let dw = (want.get(0).unwrap() - want.get(1).unwrap()).unwrap();
    let dg = (got.get(0).unwrap() - got.get(1).unwrap()).unwrap();
    let e = rel_err(&dg, &dw);
    println!("features rgb32, image 0 - image 1: max |diff| / max |ref| {e:e}");
    // the same absolute error against a ~50x smaller reference: ~2e-5 measured
    assert!(e <= 1e-4, "difference of two images: relative error {e:e}");
    // a batch gives each image the features it has alone
    let one = net.features(&x.narrow(0, 1, 1).unwrap()).unwrap();
    let e = rel_err(&one, &got.narrow(0, 1, 1).unwrap());
    assert!(e <= 3e-6, "one image alone against the same in a batch: relative error {e:e}");
    // another float dtype is taken as f32
    let f64_in = net.features(&x.narrow(0, 1, 1).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
    assert_eq!(f64_in.dtype(), DType::F32);
    assert!(rel_err(&f64_in, &one) <= 1e-7);
}

#[test]
fn load_errors_name_the_file_and_the_tensor() {
    let w = weights();
    let mut missing = w.clone();
    missing.remove("Mixed_7c.branch_pool.bn.running_var");
    let e = Inception::from_tensors(&missing, "fid.safetensors", &Device::Cpu).unwrap_err();
    assert_eq!(ddpm_cli::error_line(&e), "fid.safetensors: missing tensor `Mixed_7c.branch_pool.bn.running_var`");

    let mut misshaped = w.clone();
    let name = "Mixed_6c.branch7x7_2.conv.weight";
    misshaped.insert(name.into(), Tensor::zeros((160, 160, 7, 1), DType::F32, &Device::Cpu).unwrap());
    let e = Inception::from_tensors(&misshaped, "fid.safetensors", &Device::Cpu).unwrap_err();
    assert_eq!(
        ddpm_cli::error_line(&e),
        "fid.safetensors: tensor `Mixed_6c.branch7x7_2.conv.weight` has shape [160, 160, 7, 1], expected [160, 160, 1, 7]"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-safetensors.safetensors");
    std::fs::write(&bad, b"this is not a safetensors file").unwrap();
    let e = Inception::load(&bad, &Device::Cpu).unwrap_err();
    let line = ddpm_cli::error_line(&e);
    assert!(line.starts_with(&format!("{}: cannot read safetensors", bad.display())), "{line}");
    assert!(!line.contains('\n'));

    let net = Inception::from_tensors(w, "fid.safetensors", &Device::Cpu).unwrap();
    let two_channels = Tensor::zeros((1, 2, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = net.features(&two_channels).unwrap_err();
    assert_eq!(ddpm_cli::error_line(&e), "inception: expected 1 or 3 channels, got 2 (shape [1, 2, 8, 8])");
}

#[test]
fn fid_of_an_rgb_folder_runs_through_inception() {
    // `ddpm eval --metric fid` with an RGB image folder as the data set: --features auto takes
    // Inception (the closed-form weights above, as a safetensors file); the same images score 0,
    // other images a positive distance.
    let dir = tempfile::tempdir().unwrap();
    let weights_path = dir.path().join("inception.safetensors");
    candle_core::safetensors::save(weights(), &weights_path).unwrap();
    let folder = |name: &str, shift: u32| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for k in 0..4u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(8 * x + shift) as u8, (8 * y) as u8, (40 * k + 3 * shift) as u8]));
            img.save(d.join(format!("{k}.png"))).unwrap();
        }
        d.display().to_string()
    };
    let (reference, same, other) = (folder("reference", 0), folder("same", 0), folder("other", 17));
    let (cache, empty) = (dir.path().join("cache").display().to_string(), dir.path().join("empty").display().to_string());
    let report = |images: &str| {
        let args = [
            "ddpm", "eval", "--metric", "fid", "--data", &reference, "--images", images, "--image-size", "32", "--inception-weights",
            weights_path.to_str().unwrap(), "--cache-dir", &cache, "--device", "cpu",
        ];
        let ddpm_cli::Cli::Eval(a) = <ddpm_cli::Cli as clap::Parser>::try_parse_from(args).unwrap() else { panic!("not eval") };
        ddpm_cli::eval::fid_report(&a).unwrap()
    };
    let start = Instant::now();
    let (s, o) = (report(&same), report(&other));
    println!("two FIDs through Inception: {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(s["features"], "inception-v3");
    let (fs, fo) = (s["fid"].as_f64().unwrap(), o["fid"].as_f64().unwrap());
    assert!(fs < 1e-3 && fo > 1e-3 && fo > 100.0 * fs.max(1e-9), "same {fs}, other {fo}");
    // without weights: one line naming the file and the script that makes it
    let args = ["ddpm", "eval", "--metric", "fid", "--data", &reference, "--images", &same, "--features", "inception", "--cache-dir", &empty];
    let ddpm_cli::Cli::Eval(a) = <ddpm_cli::Cli as clap::Parser>::try_parse_from(args).unwrap() else { panic!("not eval") };
    let e = ddpm_cli::error_line(&ddpm_cli::eval::fid_report(&a).unwrap_err());
    assert!(e.contains("pt_inception-2015-12-05.safetensors") && e.contains("inception_weights_to_safetensors.py") && !e.contains('\n'), "{e}");
}
