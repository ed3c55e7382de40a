//! Loading a model by Hub repo id from a Hub cache folder with the network forbidden, as `ddpm sample`
//! does. This binary sets process-wide environment variables, so it holds a single test.

use ddpm_tests::{ddpm, ddpm_err, fixtures};

#[test]
fn sample_by_repo_id_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--someone--ddpm-mnist-tiny");
    let snap = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef0123456789abcdef01234567").unwrap();
    for f in ["config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("unet-mnist-small").join(f), snap.join(f)).unwrap();
    }
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let out = |n: &str| tmp.path().join(n).display().to_string();
    let (a, b, c) = (out("a.png"), out("b.png"), out("local.png"));
    let args = |model: &str, o: &str| -> Vec<String> {
        ["sample", "--model", model, "--num", "4", "--scheduler", "ddim", "--steps", "10", "--seed", "5", "--out", o, "--device", "cpu"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |v: Vec<String>| ddpm(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    run(args("someone/ddpm-mnist-tiny", &a)).unwrap();
    run(args("someone/ddpm-mnist-tiny", &b)).unwrap();
    run(args(&fixtures().join("unet-mnist-small").display().to_string(), &c)).unwrap();
    let (ba, bb, bc) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(ba, bb);
    assert_eq!(ba, bc, "the cached copy and the folder gave different images");
    // A repo that is not cached, with the network forbidden: the error says what was looked for and where.
    let e = ddpm_err(&["sample", "--model", "google/not-cached", "--out", &out("n.png"), "--device", "cpu"]);
    assert!(e.contains("google/not-cached") && e.contains("config.json") && e.contains(cache.to_str().unwrap()), "{e}");
}
