//! Byte-level mutations of valid model files fed to the loader (issue 22): never a panic, always `Ok`
//! or a one-line error naming a file, and never an allocation beyond a bound set by the files' size.
//!
//! Each case copies a valid model folder (`config.json` and the weights) from
//! `tests/fixtures/diffusers/unet-*`, mutates one of its files 1 to 3 times (flip, overwrite with
//! 0x00 / 0xFF / random bytes, an "interesting" little-endian integer, truncate, duplicate a range;
//! positions mostly in the file's structure, the safetensors header or the zip's pickle and central
//! directory, where a mutation reaches the parsers rather than the tensor data) with a fixed-seed
//! splitmix64, and calls `load_from_files` on it. Two targeted kinds reach further: a JSON token of
//! the config replaced (zero, negative, huge, another type, a block type, a repeated list entry),
//! and `data.pkl` mutated in place with its CRC-32 fixed in both zip headers, so that the pickle
//! machine, not the zip reader's checksum test, sees the change. The pickle machine is also run
//! alone on mutated pickles and on pickles built to cost it the most memory per byte.
//!
//! The bounds. Let F be the size of the folder's files (config + weights). The `.bin` reader
//! (`ddpm_unet::torch_pickle`, whose docs derive these) allocates at most 5 F for the zip index,
//! F for the pickle, 128 P (P <= F, the pickle's size) in the pickle machine, F for the storages
//! and 4 F for the tensors; its largest single allocation is the machine's stack (48 P at most),
//! the zip index (5 F) or one tensor (4 F, 8 F once widened to f32). The safetensors path maps the
//! file and copies each tensor once; the config is a few kB. So this test asserts, per case, that
//! the largest single allocation request stays below `64 F + 16 MiB`, and the peak of live bytes
//! above the case's start below `160 F + 16 MiB` (the sum above, with the widening to f32, the
//! non-finite check's temporaries and the model; 16 MiB for the thread pools, parsers' buffers and
//! the model's bookkeeping). A reader that trusted a declared size (40 GB for a 477-byte file) or
//! copied shared pickle values (6 GB for 702 bytes) would exceed them by orders of magnitude. The
//! figures measured are printed (`--nocapture`): about 5 F for both.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use candle_core::{DType, Device};
use ddpm_unet::load::load_from_files;

/// Counts every allocation: the live bytes, their peak, and the largest single request.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// The highest largest-allocation and peak seen in a run, as multiples of the files' size
/// (reported, to show how far below the bounds the loader stays).
static WORST: Mutex<(f64, f64)> = Mutex::new((0.0, 0.0));

impl Counting {
    fn grow(size: usize) {
        LARGEST.fetch_max(size, Relaxed);
        let live = LIVE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(live, Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Counting::grow(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Counting::grow(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Relaxed);
        Counting::grow(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test measures at a time (the counters are global).
static SERIAL: Mutex<()> = Mutex::new(());
/// The message of the last panic caught, instead of the default hook's printout.
static PANIC: Mutex<Option<String>> = Mutex::new(None);
static HOOK: AtomicBool = AtomicBool::new(false);
/// Whether the loader is running (its panics are caught and recorded).
static IN_LOADER: AtomicBool = AtomicBool::new(false);

/// The bound on the largest single allocation (module docs): 64 F + 16 MiB.
fn bound(files_len: usize) -> usize {
    64 * files_len + (16 << 20)
}

/// The bound on the live bytes (module docs): 160 F + 16 MiB.
fn peak_bound(files_len: usize) -> usize {
    160 * files_len + (16 << 20)
}

/// splitmix64 (Steele, Lea and Flood 2014): a fixed-seed source of mutations.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Picks a byte position: with probability 3/4 inside one of the `hot` ranges, else anywhere.
fn position(rng: &mut SplitMix, len: usize, hot: &[(usize, usize)]) -> usize {
    if !hot.is_empty() && rng.below(4) != 0 {
        let (a, b) = hot[rng.below(hot.len())];
        let b = b.min(len);
        if a < b {
            return a + rng.below(b - a);
        }
    }
    rng.below(len.max(1))
}

/// Applies one random mutation to `data`; returns what it did. `in_place` keeps the length (no
/// truncation or duplication).
fn mutate(
    rng: &mut SplitMix,
    data: &mut Vec<u8>,
    hot: &[(usize, usize)],
    in_place: bool,
) -> String {
    if data.is_empty() {
        data.push(rng.next() as u8);
        return "grow empty".into();
    }
    let len = data.len();
    let at = position(rng, len, hot);
    match rng.below(if in_place { 5 } else { 7 }) {
        0 => {
            let bit = 1u8 << rng.below(8);
            data[at] ^= bit;
            format!("flip bit {bit:#x} at {at}")
        }
        1 | 2 => {
            let n = 1 + rng.below(8).min(len - at - 1);
            let fill = match rng.below(3) {
                0 => 0x00,
                1 => 0xff,
                _ => rng.next() as u8,
            };
            data[at..at + n].fill(fill);
            format!("fill {n} bytes at {at} with {fill:#04x}")
        }
        3 => {
            const INTERESTING: [u64; 8] = [
                0,
                1,
                0x7f,
                0xffff,
                0x7fff_ffff,
                0xffff_ffff,
                0x7fff_ffff_ffff_ffff,
                u64::MAX,
            ];
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let w = [1usize, 2, 4, 8][rng.below(4)].min(len - at);
            data[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            format!("write {v:#x} as {w} bytes at {at}")
        }
        4 => {
            for b in &mut data[at..(at + 1 + rng.below(16)).min(len)] {
                *b = rng.next() as u8;
            }
            format!("random bytes at {at}")
        }
        5 => {
            data.truncate(at);
            format!("truncate to {at}")
        }
        _ => {
            let n = 1 + rng.below(256).min(len - at - 1);
            let range = data[at..at + n].to_vec();
            let to = position(rng, len, hot);
            data.splice(to..to, range);
            format!("duplicate {n} bytes from {at} at {to}")
        }
    }
}

/// A valid model folder and where its parsers' structure lies.
struct Corpus {
    config: Vec<u8>,
    weights: Vec<u8>,
    weights_name: &'static str,
    /// Byte ranges of the weights where a mutation reaches a parser.
    hot: Vec<(usize, usize)>,
    /// For a `.bin`: where `data.pkl`'s bytes lie and where its CRC-32 is recorded.
    pickle: Option<PickleEntry>,
}

/// The `data.pkl` entry of a torch.save zip: its bytes, and the offsets of its CRC-32 in the local
/// header and in the central directory (so that a mutated pickle can get a matching checksum and
/// reach the pickle machine instead of the zip reader's checksum test).
struct PickleEntry {
    start: usize,
    len: usize,
    crc_at: [usize; 2],
}

fn le16(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zip records it; bitwise, no table.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Finds `*/data.pkl` in the central directory starting at `cd` (entries `PK\x01\x02`: CRC at +16,
/// name length at +28, extra and comment lengths at +30 and +32, local header offset at +42, name
/// at +46) and its local header (`PK\x03\x04`: CRC at +14, name and extra lengths at +26 and +28,
/// data after 30 + both).
fn pickle_entry(zip: &[u8], cd: usize) -> PickleEntry {
    let mut at = cd;
    while &zip[at..at + 4] == b"PK\x01\x02" {
        let (n, m, k) = (le16(zip, at + 28), le16(zip, at + 30), le16(zip, at + 32));
        if zip[at + 46..at + 46 + n].ends_with(b"/data.pkl") {
            let local = le32(zip, at + 42);
            assert_eq!(&zip[local..local + 4], b"PK\x03\x04");
            let start = local + 30 + le16(zip, local + 26) + le16(zip, local + 28);
            let len = le32(zip, at + 24);
            assert_eq!(crc32(&zip[start..start + len]) as usize, le32(zip, at + 16));
            return PickleEntry {
                start,
                len,
                crc_at: [local + 14, at + 16],
            };
        }
        at += 46 + n + m + k;
    }
    panic!("no data.pkl in the central directory");
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

impl Corpus {
    fn load(dir: &str, weights_name: &'static str) -> Corpus {
        let dir = fixture("diffusers").join(dir);
        let config = std::fs::read(dir.join("config.json")).unwrap();
        let weights = std::fs::read(dir.join(weights_name)).unwrap();
        let len = weights.len();
        let (hot, pickle) = if weights_name.ends_with(".safetensors") {
            // the 8-byte header length and the JSON header
            let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
            (vec![(0, 8 + n)], None)
        } else {
            // the zip's first entry (data.pkl, with the local header) and the central directory,
            // whose offset the end-of-central-directory record (the last 22 bytes) gives at +16
            let eocd = len - 22;
            assert_eq!(&weights[eocd..eocd + 4], b"PK\x05\x06");
            let cd = le32(&weights, eocd + 16);
            (
                vec![(0, 64 << 10), (cd, len)],
                Some(pickle_entry(&weights, cd)),
            )
        };
        Corpus {
            config,
            weights,
            weights_name,
            hot,
            pickle,
        }
    }
}

/// A file on disk and its content, rewritten only where a new content differs (most mutations
/// touch a few bytes of a file of megabytes: rewriting all of it would dominate the test's time).
struct Disk {
    path: PathBuf,
    content: Vec<u8>,
}

impl Disk {
    fn new(path: PathBuf) -> Disk {
        std::fs::write(&path, b"").unwrap();
        Disk {
            path,
            content: Vec::new(),
        }
    }

    /// Makes the file hold `new`: writes from the first differing byte to the last one (to the end
    /// when the length changes) and truncates.
    fn set(&mut self, new: &[u8]) {
        use std::os::unix::fs::FileExt;
        let old = &self.content;
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        if prefix == old.len() && prefix == new.len() {
            return;
        }
        let end = if old.len() == new.len() {
            let suffix = old[prefix..]
                .iter()
                .rev()
                .zip(new[prefix..].iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            new.len() - suffix
        } else {
            new.len()
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.write_all_at(&new[prefix..end], prefix as u64).unwrap();
        f.set_len(new.len() as u64).unwrap();
        self.content.clear();
        self.content.extend_from_slice(new);
    }
}

/// What happened to one case.
enum Outcome {
    Ok,
    Err,
}

/// Puts `config` and `weights` into the folder's files, loads them under the counting allocator
/// and checks the three properties; `what` describes the case for the failure message.
fn check_case(files: &mut [Disk; 2], config: &[u8], weights: &[u8], what: &str) -> Outcome {
    files[0].set(config);
    files[1].set(weights);
    let (cfg_path, w_path) = (files[0].path.clone(), files[1].path.clone());
    if std::env::var_os("DDPM_MUTATION_VERBOSE").is_some() {
        eprintln!("{what}");
    }
    let limit = bound(config.len() + weights.len());
    let start = LIVE.load(Relaxed);
    PEAK.store(start, Relaxed);
    LARGEST.store(0, Relaxed);
    IN_LOADER.store(true, Relaxed);
    let result = catch_unwind(AssertUnwindSafe(|| {
        load_from_files(&cfg_path, &w_path, &Device::Cpu, DType::F32).map(drop)
    }));
    IN_LOADER.store(false, Relaxed);
    let largest = LARGEST.load(Relaxed);
    let peak = PEAK.load(Relaxed).saturating_sub(start);
    if std::env::var_os("DDPM_MUTATION_VERBOSE").is_some() {
        eprintln!("  largest {largest} peak {peak} bound {limit}");
    }
    {
        let f = (config.len() + weights.len()) as f64;
        let mut w = WORST.lock().unwrap_or_else(|e| e.into_inner());
        w.0 = w.0.max(largest as f64 / f);
        w.1 = w.1.max(peak as f64 / f);
    }
    let outcome = match result {
        Err(_) => {
            let msg = PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_default();
            panic!("{what}: the loader panicked: {msg}");
        }
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "{what}: error not one line: {msg:?}"
            );
            let names_file = [&cfg_path, &w_path]
                .iter()
                .any(|p| msg.contains(&*p.to_string_lossy()));
            assert!(names_file, "{what}: error names neither file: {msg}");
            if std::env::var_os("DDPM_MUTATION_VERBOSE").is_some() {
                eprintln!("  -> {msg}");
            }
            Outcome::Err
        }
    };
    assert!(
        largest <= limit,
        "{what}: an allocation of {largest} bytes, over the bound {limit}"
    );
    let peak_limit = peak_bound(config.len() + weights.len());
    assert!(
        peak <= peak_limit,
        "{what}: {peak} live bytes at the peak, over the bound {peak_limit}"
    );
    outcome
}

/// `config.json` and the weights file `weights_name` in `dir`, empty.
fn folder(dir: &Path, weights_name: &str) -> [Disk; 2] {
    [
        Disk::new(dir.join("config.json")),
        Disk::new(dir.join(weights_name)),
    ]
}

/// Panics inside the loader are recorded for the failure message; others (this test's asserts)
/// go to the default hook.
fn quiet_panics() {
    if !HOOK.swap(true, Relaxed) {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_LOADER.load(Relaxed) {
                *PANIC.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(info.to_string().replace('\n', " "));
            } else {
                default(info)
            }
        }));
    }
}

/// Replaces one JSON token of `config` (a number, a string or a literal) by a value chosen to
/// reach the config's validation: zero, negative, huge, fractional, of another type, a block type,
/// or the token repeated (one more list entry).
fn mutate_token(rng: &mut SplitMix, config: &mut Vec<u8>) -> String {
    const VALUES: [&str; 25] = [
        // in a shape: an empty tensor whose other dimensions multiply past u64
        "0, 18446744073709551615",
        "4294967296, 4294967296, 0",
        "18446744073709551615",
        "0",
        "-1",
        "1",
        "3",
        "7",
        "64",
        "1024",
        "1e30",
        "-1e30",
        "4294967296",
        "18446744073709551616",
        "2.5",
        "null",
        "true",
        "\"\"",
        "[]",
        "{}",
        "[0]",
        "\"DownBlock2D\"",
        "\"AttnDownBlock2D\"",
        "\"UpBlock2D\"",
        "\"AttnUpBlock2D\"",
    ];
    // tokens: "strings", and runs of number or literal characters
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < config.len() {
        let c = config[i];
        let end = if c == b'"' {
            let close = config[i + 1..].iter().position(|&b| b == b'"');
            close.map(|n| i + n + 2)
        } else if c.is_ascii_alphanumeric() || c == b'-' {
            let n = config[i..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || b"-+.".contains(b))
                .count();
            Some(i + n)
        } else {
            None
        };
        match end {
            Some(e) => {
                tokens.push((i, e));
                i = e;
            }
            None => i += 1,
        }
    }
    if tokens.is_empty() {
        return mutate(rng, config, &[], false);
    }
    let (a, b) = tokens[rng.below(tokens.len())];
    let old = String::from_utf8_lossy(&config[a..b]).into_owned();
    let new = if rng.below(6) == 0 {
        format!("{old}, {old}")
    } else {
        VALUES[rng.below(VALUES.len())].to_string()
    };
    config.splice(a..b, new.bytes());
    format!("token {old} -> {new}")
}

/// Replaces a JSON token of a safetensors header (dtype, shape entry, offset) as
/// [`mutate_token`] does, keeping the 8-byte header length in step.
fn mutate_header_token(rng: &mut SplitMix, weights: &mut Vec<u8>) -> String {
    if weights.len() < 8 {
        return mutate(rng, weights, &[], false);
    }
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    if n > weights.len() - 8 {
        return mutate(rng, weights, &[], false);
    }
    let mut header = weights[8..8 + n].to_vec();
    let what = mutate_token(rng, &mut header);
    weights.splice(8..8 + n, header.iter().copied());
    weights[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    format!("header {what}")
}

/// Mutates `data.pkl` in place and records its new CRC-32 in both headers of the zip.
fn mutate_pickle(rng: &mut SplitMix, weights: &mut [u8], p: &PickleEntry) -> String {
    let mut pickle = weights[p.start..p.start + p.len].to_vec();
    let what = mutate(rng, &mut pickle, &[], true);
    weights[p.start..p.start + p.len].copy_from_slice(&pickle);
    let crc = crc32(&pickle).to_le_bytes();
    for at in p.crc_at {
        weights[at..at + 4].copy_from_slice(&crc);
    }
    format!("data.pkl {what}, CRC fixed")
}

/// Runs `cases` mutated copies of the corpus: each mutates the config (1 in 4: a byte or a JSON
/// token), else the weights' bytes, or (half of those) the `.bin`'s pickle with its CRC fixed or a
/// JSON token of the safetensors header.
fn run(corpus: &Corpus, cases: usize, seed: u64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let mut files = folder(dir.path(), corpus.weights_name);
    // the unmutated folder loads (and warms up the thread pools outside the measured cases)
    let base = check_case(&mut files, &corpus.config, &corpus.weights, "original");
    assert!(matches!(base, Outcome::Ok), "the original folder must load");
    *WORST.lock().unwrap() = (0.0, 0.0);
    let mut rng = SplitMix(seed);
    let (mut ok, mut err) = (0, 0);
    let (mut t_ok, mut t_err) = (0.0, 0.0);
    let t0 = std::time::Instant::now();
    for case in 0..cases {
        let mut config = corpus.config.clone();
        let mut weights = corpus.weights.clone();
        let target = match (rng.below(8), &corpus.pickle) {
            (0 | 1, _) => 0,
            (2..=4, Some(_)) => 2,
            (2..=4, None) => 3,
            _ => 1,
        };
        let mut what = format!("{} case {case}:", corpus.weights_name);
        for _ in 0..1 + rng.below(3) {
            let m = match (target, &corpus.pickle) {
                (0, _) if rng.below(3) == 0 => mutate(&mut rng, &mut config, &[], false),
                (0, _) => mutate_token(&mut rng, &mut config),
                (2, Some(p)) => mutate_pickle(&mut rng, &mut weights, p),
                (3, _) => mutate_header_token(&mut rng, &mut weights),
                _ => mutate(&mut rng, &mut weights, &corpus.hot, false),
            };
            what.push_str(&format!(
                " [{}] {m};",
                ["config.json", "weights", "weights", "weights"][target]
            ));
        }
        let tc = std::time::Instant::now();
        match check_case(&mut files, &config, &weights, &what) {
            Outcome::Ok => {
                ok += 1;
                t_ok += tc.elapsed().as_secs_f64()
            }
            Outcome::Err => {
                err += 1;
                t_err += tc.elapsed().as_secs_f64()
            }
        }
    }
    let (largest, peak) = *WORST.lock().unwrap();
    eprintln!(
        "{}: {cases} cases, {ok} loaded ({t_ok:.1} s), {err} one-line errors ({t_err:.1} s), {:.1} s; \
         at most a {largest:.2} F allocation and a {peak:.2} F peak (F: the files' size)",
        corpus.weights_name,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn mutated_safetensors_folders_load_or_fail_cleanly() {
    let corpus = Corpus::load("unet-mnist-small", "diffusion_pytorch_model.safetensors");
    run(&corpus, 1200, 0x5afe_7e45);
}

#[test]
fn mutated_bin_folders_load_or_fail_cleanly() {
    let corpus = Corpus::load(
        "unet-cifar10-layout-legacy-bin",
        "diffusion_pytorch_model.bin",
    );
    run(&corpus, 1200, 0xb1b_f11e);
}

#[test]
fn crafted_bin_files_stay_within_the_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let mut disk = folder(dir.path(), "diffusion_pytorch_model.bin");
    let config = std::fs::read(fixture(
        "diffusers/unet-cifar10-layout-legacy-bin/config.json",
    ))
    .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture("hostile"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 10);
    for f in files {
        let weights = std::fs::read(&f).unwrap();
        let what = f.file_name().unwrap().to_string_lossy().into_owned();
        let out = check_case(&mut disk, &config, &weights, &what);
        assert!(matches!(out, Outcome::Err), "{what} must be refused");
    }
}

/// The pickle machine alone, on mutated `data.pkl` bytes (every mutation kind, truncation and
/// duplication included): never a panic, one-line errors, and its documented bounds (see
/// `ddpm_unet::torch_pickle::machine`): live bytes below 128 P and single allocations below 48 P,
/// P the pickle's size, plus 64 KiB.
#[test]
fn mutated_pickles_stay_within_the_machine_bound() {
    use ddpm_unet::torch_pickle::machine::read_state_dict;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    quiet_panics();
    let mut pickles = Vec::new();
    for f in [
        "diffusers/unet-cifar10-layout-legacy-bin/diffusion_pytorch_model.bin",
        "torch-bin/parity.bin",
    ] {
        let zip = std::fs::read(fixture(f)).unwrap();
        let eocd = zip.len() - 22;
        let p = pickle_entry(&zip, le32(&zip, eocd + 16));
        pickles.push(zip[p.start..p.start + p.len].to_vec());
    }
    let mut rng = SplitMix(0x9c41_e5ee);
    let (mut worst_largest, mut worst_peak, mut ok) = (0f64, 0f64, 0);
    let cases = 2000;
    let t0 = std::time::Instant::now();
    for case in 0..cases {
        let mut p = pickles[case % pickles.len()].clone();
        let mut what = format!("pickle case {case}:");
        for _ in 0..1 + rng.below(3) {
            what.push_str(&format!(" {};", mutate(&mut rng, &mut p, &[], false)));
        }
        let start = LIVE.load(Relaxed);
        PEAK.store(start, Relaxed);
        LARGEST.store(0, Relaxed);
        IN_LOADER.store(true, Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| read_state_dict(&p).map(|sd| sd.len())));
        IN_LOADER.store(false, Relaxed);
        let (largest, peak) = (
            LARGEST.load(Relaxed),
            PEAK.load(Relaxed).saturating_sub(start),
        );
        match result {
            Err(_) => {
                let msg = PANIC
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                panic!("{what}: the pickle machine panicked: {msg}");
            }
            Ok(Ok(_)) => ok += 1,
            Ok(Err(msg)) => assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg:?}"),
        }
        let n = p.len().max(1);
        assert!(
            largest <= 48 * n + (64 << 10),
            "{what}: an allocation of {largest} bytes"
        );
        assert!(
            peak <= 128 * n + (64 << 10),
            "{what}: {peak} live bytes at the peak"
        );
        if n >= 16 << 10 {
            worst_largest = worst_largest.max(largest as f64 / n as f64);
            worst_peak = worst_peak.max(peak as f64 / n as f64);
        }
    }
    eprintln!(
        "data.pkl: {cases} cases, {ok} read, {:.1} s; pickles of 16 KiB and more: at most a \
         {worst_largest:.2} P allocation and a {worst_peak:.2} P peak (P: the pickle's size)",
        t0.elapsed().as_secs_f64()
    );
}

/// Pickles built to cost the machine the most memory per byte (one value per opcode byte, every
/// value a new container, string or memo entry): the bounds of `machine` hold for them too.
#[test]
fn worst_case_pickles_stay_within_the_machine_bound() {
    use ddpm_unet::torch_pickle::machine::read_state_dict;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 2^16 + 5 bytes: one push more than a power of two, so that the stack's capacity has just
    // doubled (its worst case)
    let n = (1 << 16) + 5;
    let rep = |head: &[u8], unit: &[u8], tail: &[u8]| {
        let mut p = head.to_vec();
        while p.len() < n {
            p.extend_from_slice(unit);
        }
        p.extend_from_slice(tail);
        p
    };
    let mut long_puts = b"N".to_vec();
    for i in 0..n as u32 / 5 {
        long_puts.push(b'r');
        long_puts.extend_from_slice(&i.to_le_bytes());
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty dicts", rep(b"", b"}", b".")),
        ("empty lists", rep(b"", b"]", b".")),
        ("empty tuples", rep(b"", b")", b".")),
        ("Nones", rep(b"", b"N", b".")),
        ("MEMOIZE", rep(b"N", b"\x94", b".")),
        ("memoized strings", rep(b"", b"\x8c\x00\x94", b".")),
        ("short strings", rep(b"", b"\x8c\x01a", b".")),
        ("dict items", rep(b"}", b"K\x00Ns", b".")),
        ("list APPENDS", rep(b"](", b"N", b"e.")),
        ("single APPENDs", rep(b"]", b"Na", b".")),
        ("one big tuple", rep(b"(", b"N", b"t.")),
        ("LONG_BINPUT", long_puts),
        ("BINGET", rep(b"Nq\x00", b"h\x00", b".")),
        ("1-tuples", rep(b"", b"N\x85", b".")),
        ("dicts of dicts", rep(b"", b"}}K\x00s", b".")),
    ];
    for (name, p) in cases {
        let start = LIVE.load(Relaxed);
        PEAK.store(start, Relaxed);
        LARGEST.store(0, Relaxed);
        let r = read_state_dict(&p).map(|sd| sd.len());
        let (largest, peak) = (
            LARGEST.load(Relaxed),
            PEAK.load(Relaxed).saturating_sub(start),
        );
        let n = p.len();
        eprintln!(
            "{name}: {n} bytes, largest allocation {:.1} P, peak {:.1} P, {}",
            largest as f64 / n as f64,
            peak as f64 / n as f64,
            match r {
                Ok(k) => format!("Ok({k})"),
                Err(e) => e,
            }
        );
        assert!(
            largest <= 48 * n,
            "{name}: an allocation of {largest} bytes"
        );
        assert!(peak <= 128 * n, "{name}: {peak} live bytes at the peak");
    }
}

/// A safetensors file: the 8-byte little-endian header length (`declared`, or the header's own
/// length), the JSON header, then `data`.
fn safetensors(header: &str, declared: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut b = declared
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Crafted safetensors files (built here): each a one-line error naming the file, no panic, within
/// the bounds. The first two are empty tensors whose other sizes multiply past u64: safetensors
/// accepts them (the product of all sizes is 0) and candle's stride computation overflowed.
#[test]
fn crafted_safetensors_files_stay_within_the_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    quiet_panics();
    let dir = tempfile::tempdir().unwrap();
    let mut disk = folder(dir.path(), "diffusion_pytorch_model.safetensors");
    let config = std::fs::read(fixture("diffusers/unet-mnist-small/config.json")).unwrap();
    let t = |dtype: &str, shape: &str, offsets: &str| {
        format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
    };
    // 10,000 nested lists in a field serde skips (its recursion limit is 128)
    let deep = format!(
        r#"{{"w":{{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{}{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "empty, sizes overflow",
            safetensors(&t("F32", "[0,18446744073709551615,2]", "[0,0]"), None, b""),
        ),
        (
            "empty, sizes overflow 2",
            safetensors(&t("F32", "[0,4294967296,4294967296]", "[0,0]"), None, b""),
        ),
        (
            "huge shape, 4 bytes",
            safetensors(&t("F32", "[100000,100000]", "[0,4]"), None, &[0; 4]),
        ),
        (
            "header length u64::MAX",
            safetensors(&t("F32", "[1]", "[0,4]"), Some(u64::MAX), &[0; 4]),
        ),
        (
            "header length 99 MB",
            safetensors(&t("F32", "[1]", "[0,4]"), Some(99_000_000), &[0; 4]),
        ),
        (
            "offsets past the end",
            safetensors(&t("F32", "[1]", "[0,18446744073709551615]"), None, &[0; 4]),
        ),
        (
            "reversed offsets",
            safetensors(&t("F32", "[1]", "[4,0]"), None, &[0; 4]),
        ),
        ("deeply nested header", safetensors(&deep, None, &[0; 4])),
        (
            "unknown dtype",
            safetensors(&t("Q4", "[1]", "[0,4]"), None, &[0; 4]),
        ),
        (
            "bool tensor",
            safetensors(&t("BOOL", "[4]", "[0,4]"), None, &[1; 4]),
        ),
    ];
    for (what, weights) in cases {
        let out = check_case(&mut disk, &config, &weights, what);
        assert!(matches!(out, Outcome::Err), "{what} must be refused");
    }
}
