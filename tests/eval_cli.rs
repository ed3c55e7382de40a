//! `ddpm eval --metric fid` on a small labelled MNIST folder (512 training and 200 test digits cut from
//! the shipped MNIST): the classifier is trained once and cached, the reference statistics are cached,
//! the test split scored against itself is at distance 0, and noise is far from it.

use std::path::Path;

use ddpm_cli::data::{self, Split};
use ddpm_tests::{ddpm_err, parse};

/// Writes the first `n` images and labels of `split` of the shipped MNIST as IDX files into `dir`.
fn write_idx(dir: &Path, split: Split, n: usize) {
    let mut set = data::load("mnist", split, 28, 1).unwrap();
    set.truncate(n);
    let stem = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let mut images = vec![0, 0, 8, 3];
    for v in [n, 28, 28] {
        images.extend((v as u32).to_be_bytes());
    }
    images.extend(&set.pixels);
    std::fs::write(dir.join(format!("{stem}-images-idx3-ubyte")), images).unwrap();
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    labels.extend(&set.labels);
    std::fs::write(dir.join(format!("{stem}-labels-idx1-ubyte")), labels).unwrap();
}

/// The FID report of `ddpm eval --metric fid ARGS...`.
fn fid(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", "--metric", "fid", "--device", "cpu"];
    all.extend(args);
    let ddpm_cli::Cli::Eval(a) = parse(&all) else { panic!("not an eval command") };
    ddpm_cli::eval::fid_report(&a).unwrap()
}

#[test]
fn fid_of_the_test_split_is_zero_and_of_noise_is_large() {
    let tmp = tempfile::tempdir().unwrap();
    let (data_dir, cache, pngs, noise) = (tmp.path().join("digits"), tmp.path().join("cache"), tmp.path().join("pngs"), tmp.path().join("noise"));
    for d in [&data_dir, &pngs, &noise] {
        std::fs::create_dir(d).unwrap();
    }
    write_idx(&data_dir, Split::Train, 512);
    write_idx(&data_dir, Split::Test, 200);
    // the test split itself as PNG files, and 200 images of uniform noise
    let test = data::load(data_dir.to_str().unwrap(), Split::Test, 28, 1).unwrap();
    assert_eq!(test.labels.len(), 200);
    let mut rng = ddpm_core::NoiseRng::new(5);
    for i in 0..test.len {
        image::GrayImage::from_raw(28, 28, test.image(i).to_vec()).unwrap().save(pngs.join(format!("{i:04}.png"))).unwrap();
        let random: Vec<u8> = (0..784).map(|_| (rng.uniform() * 256.0) as u8).collect();
        image::GrayImage::from_raw(28, 28, random).unwrap().save(noise.join(format!("{i:04}.png"))).unwrap();
    }
    let (d, c) = (data_dir.to_str().unwrap(), cache.to_str().unwrap());
    let same = fid(&["--data", d, "--images", pngs.to_str().unwrap(), "--cache-dir", c]);
    // the same 200 images: the same features, so mu and S agree and d^2 = 0 up to round-off
    assert!(same["fid"].as_f64().unwrap() < 1e-3, "{same}");
    assert_eq!(same["features"], "classifier");
    assert_eq!(same["num"], 200);
    let acc = same["classifier_test_accuracy"].as_f64().unwrap();
    // 8 steps of Adam on 512 digits: far above chance (0.1), far below a full run's 0.98
    assert!(acc > 0.3, "{same}");
    // trained once: the cached classifier and statistics are reused (same files, same accuracy)
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let times: Vec<_> = cached.iter().map(|p| modified(p)).collect();
    let far = fid(&["--data", d, "--images", noise.to_str().unwrap(), "--cache-dir", c]);
    assert_eq!(far["classifier_test_accuracy"].as_f64().unwrap(), acc);
    assert_eq!(cached.iter().map(|p| modified(p)).collect::<Vec<_>>(), times);
    assert!(far["fid"].as_f64().unwrap() > 10.0, "{far}");
    // one-line errors: no labels, no images, nothing to score
    let e = ddpm_err(&["eval", "--metric", "fid", "--data", d, "--images", tmp.path().join("none").to_str().unwrap(), "--cache-dir", c]);
    assert_eq!(e, format!("--images {}: no such folder", tmp.path().join("none").display()));
    std::fs::remove_file(data_dir.join("train-labels-idx1-ubyte")).unwrap();
    let e = ddpm_err(&["eval", "--metric", "fid", "--data", d, "--images", pngs.to_str().unwrap(), "--cache-dir", c]);
    assert!(e.contains("no labels"), "{e}");
}

#[test]
fn the_classifier_trains_deterministically() {
    let mut set = data::load("mnist", Split::Train, 28, 1).unwrap();
    set.truncate(256);
    let a = ddpm_cli::fid::classifier::train_weights(&set, &candle_core::Device::Cpu).unwrap();
    let b = ddpm_cli::fid::classifier::train_weights(&set, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.len(), 10);
    for (k, v) in &a {
        let (x, y) = (v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{k} differs between two trainings");
    }
}
