//! Training data: MNIST-style IDX files, CIFAR-10 binary batches and folders of images, held in memory
//! as 8-bit pixels and turned into batches scaled to [-1, 1].

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use ddpm_core::NoiseRng;

/// A dataset of equally sized images, kept as 8-bit pixels in (N, C, H, W) order.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// Pixel values, image after image, each in C, H, W order.
    pub pixels: Vec<u8>,
    /// Number of images.
    pub len: usize,
    /// Channels per image (1 or 3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Where the images came from, for messages.
    pub source: String,
    /// The class of each image, where the dataset has them (MNIST's `*-labels-idx1-ubyte` file, the
    /// label byte of CIFAR-10 records, a parquet file's `label` column); empty otherwise.
    pub labels: Vec<u8>,
}

/// Which split of a named dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training images.
    Train,
    /// The held-out test images.
    Test,
}

impl ImageSet {
    /// Number of values in one image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Images `indices` as an f32 (B, C, H, W) tensor on `device`, scaled from [0, 255] to [-1, 1]
    /// (x = p / 127.5 - 1), each flipped left-right where `flips[k]` is true.
    pub fn batch(&self, indices: &[usize], flips: &[bool], device: &Device) -> Result<Tensor> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut out = Vec::with_capacity(indices.len() * self.image_len());
        for (k, &i) in indices.iter().enumerate() {
            let img = self.image(i);
            let flip = flips.get(k).copied().unwrap_or(false);
            for ch in 0..c {
                for y in 0..h {
                    let row = &img[(ch * h + y) * w..(ch * h + y + 1) * w];
                    for x in 0..w {
                        let p = if flip { row[w - 1 - x] } else { row[x] };
                        out.push(p as f32 / 127.5 - 1.0);
                    }
                }
            }
        }
        // through pinned staging buffers on CUDA: the copy does not wait for the previous step
        Ok(ddpm_core::ops::upload(out, (indices.len(), c, h, w), device)?)
    }

    /// Keeps the first `n` images (all of them when `n` is larger).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.len = n;
            self.pixels.truncate(n * self.image_len());
            self.labels.truncate(n);
        }
    }
}

/// A permutation of 0..n drawn from `rng` (Fisher-Yates).
pub fn permutation(n: usize, rng: &mut NoiseRng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// The largest IDX image file read, 4 GiB of pixels (MNIST's training set is 47 MB): a header that
/// declares more is refused before anything is read.
const MAX_IDX_BYTES: usize = 1 << 32;

/// The big-endian u32 at `offset` of an IDX header, if the bytes reach that far.
fn be_u32(bytes: &[u8], offset: usize) -> Option<usize> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Opens a file for reading, through a gzip decoder when its name ends in `.gz`.
fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let buffered = std::io::BufReader::new(file);
    Ok(if path.extension().is_some_and(|e| e == "gz") { Box::new(flate2::read::GzDecoder::new(buffered)) } else { Box::new(buffered) })
}

/// Reads an IDX image file, un-gzipping it when its name ends in `.gz`, without ever reading (or
/// holding) more than its header declares: a small `.gz` that would expand to gigabytes stops at the
/// declared size, and a header whose size overflows, or exceeds [`MAX_IDX_BYTES`], is an error.
fn read_idx_file(path: &Path) -> Result<ImageSet> {
    let mut reader = open_maybe_gz(path)?;
    let unreadable = || format!("{}: cannot read (not a valid gzip file?)", path.display());
    let mut bytes = Vec::with_capacity(16);
    reader.by_ref().take(16).read_to_end(&mut bytes).with_context(unreadable)?;
    let need = idx_len(&bytes, path)?;
    // the body grows with what is actually read, never beyond the declared size
    reader.take((need - 16) as u64).read_to_end(&mut bytes).with_context(unreadable)?;
    parse_idx_images(&bytes, path)
}

/// The total size in bytes (the 16-byte header included) that an IDX image header declares,
/// checked: magic 0x00000803, and 16 + N H W neither overflowing nor above [`MAX_IDX_BYTES`].
fn idx_len(bytes: &[u8], path: &Path) -> Result<usize> {
    let be = |o: usize| be_u32(bytes, o).with_context(|| format!("{}: truncated IDX header", path.display()));
    let magic = be(0)?;
    if magic != 0x0803 {
        bail!("{}: IDX magic is {magic:#010x}, expected 0x00000803 (u8 images, 3 dimensions)", path.display());
    }
    let (n, h, w) = (be(4)?, be(8)?, be(12)?);
    match n.checked_mul(h).and_then(|p| p.checked_mul(w)).and_then(|p| p.checked_add(16)) {
        Some(need) if need <= MAX_IDX_BYTES => Ok(need),
        _ => bail!("{}: the header declares {n} images of {h}x{w}, more than the {MAX_IDX_BYTES} bytes this reader accepts", path.display()),
    }
}

/// Parses an IDX image file (magic 0x00000803: unsigned bytes, 3 dimensions N, H, W).
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<ImageSet> {
    let need = idx_len(bytes, path)?;
    // idx_len read the 16 header bytes
    let dim = |o: usize| be_u32(bytes, o).unwrap_or_default();
    let (n, h, w) = (dim(4), dim(8), dim(12));
    if bytes.len() < need {
        bail!("{}: truncated: header says {n} images of {h}x{w} ({need} bytes), file has {}", path.display(), bytes.len());
    }
    Ok(ImageSet {
        pixels: bytes[16..need].to_vec(),
        len: n,
        channels: 1,
        height: h,
        width: w,
        source: path.display().to_string(),
        labels: Vec::new(),
    })
}

/// The labels beside an IDX image file (`train-images-idx3-ubyte[.gz]` -> `train-labels-idx1-ubyte[.gz]`,
/// magic 0x00000801, N, then N bytes), empty when there is no such file. A label file that does not
/// hold exactly `n` labels is an error naming it.
fn read_idx_labels(images: &Path, n: usize) -> Result<Vec<u8>> {
    let name = images.file_name().and_then(|s| s.to_str()).unwrap_or_default().replace("-images-idx3", "-labels-idx1").replace("-images.idx3", "-labels.idx1");
    let path = images.with_file_name(name);
    if !path.is_file() || path == images {
        return Ok(Vec::new());
    }
    let reader = open_maybe_gz(&path)?;
    // never more than the header and the n labels the images need, plus one byte to see an excess
    let mut bytes = Vec::new();
    reader.take(8 + n as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("{}: cannot read (not a valid gzip file?)", path.display()))?;
    let be = |o: usize| be_u32(&bytes, o);
    if be(0) != Some(0x0801) {
        bail!("{}: not an IDX label file (magic is not 0x00000801)", path.display());
    }
    if be(4) != Some(n) || bytes.len() != 8 + n {
        bail!("{}: holds {} labels for {n} images", path.display(), be(4).unwrap_or(0));
    }
    Ok(bytes.split_off(8))
}

/// Finds the IDX image file of `split` in `dir` (`train-images-idx3-ubyte[.gz]` or `t10k-...`).
fn find_idx(dir: &Path, split: Split) -> Option<PathBuf> {
    let stem = match split {
        Split::Train => "train-images-idx3-ubyte",
        Split::Test => "t10k-images-idx3-ubyte",
    };
    [format!("{stem}.gz"), stem.to_string(), stem.replace("-idx3", ".idx3")]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// The CIFAR-10 binary batch files of `split` in `dir` (`data_batch_{1..5}.bin` or `test_batch.bin`,
/// also inside a `cifar-10-batches-bin/` subfolder).
fn find_cifar(dir: &Path, split: Split) -> Vec<PathBuf> {
    let names: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".into()],
    };
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        let files: Vec<PathBuf> = names.iter().map(|n| d.join(n)).filter(|p| p.is_file()).collect();
        if !files.is_empty() {
            return files;
        }
    }
    Vec::new()
}

/// Reads CIFAR-10 binary batches: records of 1 label byte then 3x32x32 pixels in C, H, W order.
pub fn load_cifar_batches(files: &[PathBuf]) -> Result<ImageSet> {
    const REC: usize = 1 + 3 * 32 * 32;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        let b = std::fs::read(f).with_context(|| format!("{}: cannot read", f.display()))?;
        if b.len() % REC != 0 {
            bail!("{}: size {} is not a whole number of {REC}-byte CIFAR-10 records", f.display(), b.len());
        }
        for rec in b.chunks_exact(REC) {
            labels.push(rec[0]);
            pixels.extend_from_slice(&rec[1..]);
        }
    }
    let len = pixels.len() / (REC - 1);
    Ok(ImageSet { pixels, len, channels: 3, height: 32, width: 32, source: format!("{} CIFAR-10 batch file(s)", files.len()), labels })
}

/// Image file extensions that the `image` crate reads here.
const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Loads every image under `dir` (recursively, in sorted order), converted to `channels` (1 or 3),
/// resized so the short side is `size` and centre-cropped to `size` x `size`. Unreadable files are
/// skipped with a warning and counted; a folder with no usable image is an error.
pub fn load_image_folder(dir: &Path, size: usize, channels: usize) -> Result<ImageSet> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    let mut pixels = Vec::new();
    let (mut ok, mut skipped) = (0usize, 0usize);
    for f in files.iter().filter(|f| {
        f.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
    }) {
        match image::open(f) {
            Ok(img) => {
                pixels.extend(crate::imageio::to_chw(&img, size, channels));
                ok += 1;
            }
            Err(e) => {
                eprintln!("warning: skipping {}: {e}", f.display());
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} unreadable image file(s) skipped in {}", dir.display());
    }
    if ok == 0 {
        bail!("{}: no usable image found (looked recursively for {})", dir.display(), IMAGE_EXTS.join(", "));
    }
    Ok(ImageSet { pixels, len: ok, channels, height: size, width: size, source: dir.display().to_string(), labels: Vec::new() })
}

/// Lists the regular files below `dir`, recursively, each once. Links are followed only to files and
/// folders inside `dir` (by canonical path) and each folder is visited once, so a link out of the
/// folder or into a cycle is skipped; so are FIFOs, sockets and devices (reading one can block
/// forever). What was skipped is counted in one warning.
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let root = dir.canonicalize().with_context(|| format!("{}: cannot list folder", dir.display()))?;
    let (mut seen, mut skipped) = (std::collections::HashSet::new(), 0usize);
    walk_folder(&root, &root, &mut seen, out, &mut skipped)?;
    out.sort();
    out.dedup();
    if skipped > 0 {
        eprintln!("warning: {skipped} entries under {} skipped (not a regular file, or a link out of the folder or back into it)", dir.display());
    }
    Ok(())
}

/// [`collect_files`]' walk of folder `dir` (canonical) below `root`.
fn walk_folder(dir: &Path, root: &Path, seen: &mut std::collections::HashSet<PathBuf>, out: &mut Vec<PathBuf>, skipped: &mut usize) -> Result<()> {
    if !seen.insert(dir.to_path_buf()) {
        *skipped += 1;
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))?;
    for e in entries {
        let p = e.with_context(|| format!("{}: cannot list folder", dir.display()))?.path();
        // where the entry leads, links resolved; a broken link or one out of the folder is skipped
        let Some(real) = p.canonicalize().ok().filter(|r| r.starts_with(root)) else {
            *skipped += 1;
            continue;
        };
        match std::fs::metadata(&real) {
            Ok(m) if m.is_dir() => walk_folder(&real, root, seen, out, skipped)?,
            Ok(m) if m.is_file() => out.push(real),
            _ => *skipped += 1,
        }
    }
    Ok(())
}

/// The folder that holds the project's shipped data: `./data` when it exists, else the `data/` of the
/// source tree this binary was built from.
pub fn data_root() -> PathBuf {
    let local = PathBuf::from("data");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

/// Loads a dataset by name (`mnist`, `fashion-mnist`, `cifar10`: from `data/NAME/` when that folder
/// exists, else from the Hub's parquet files, see [`crate::hub_data`]) or by path (a folder of IDX
/// files, CIFAR-10 binary batches or images). `size` and `channels` apply to image folders.
pub fn load(spec: &str, split: Split, size: usize, channels: usize) -> Result<ImageSet> {
    let named = matches!(spec, "mnist" | "fashion-mnist" | "cifar10");
    let dir = if named { data_root().join(spec) } else { PathBuf::from(spec) };
    if !dir.is_dir() {
        if let Some(d) = crate::hub_data::find(spec).filter(|_| named) {
            return crate::hub_data::load(d, split, &ddpm_unet::hub::HubOptions::from_env());
        }
        bail!("--data {spec}: no such folder (expected a dataset name: mnist, fashion-mnist, cifar10, or a folder of IDX files, CIFAR-10 batches or images)");
    }
    if let Some(f) = find_idx(&dir, split) {
        let mut set = read_idx_file(&f)?;
        set.labels = read_idx_labels(&f, set.len)?;
        return Ok(set);
    }
    let cifar = find_cifar(&dir, split);
    if !cifar.is_empty() {
        return load_cifar_batches(&cifar);
    }
    // a folder holding only the other split's IDX or CIFAR-10 files is that split's dataset, not a
    // folder of images: name what is missing
    let other = match split {
        Split::Train => Split::Test,
        Split::Test => Split::Train,
    };
    if find_idx(&dir, other).is_some() || !find_cifar(&dir, other).is_empty() {
        let missing = match split {
            Split::Train => "train-images-idx3-ubyte[.gz] or data_batch_1.bin ... data_batch_5.bin",
            Split::Test => "t10k-images-idx3-ubyte[.gz] or test_batch.bin",
        };
        bail!("{}: holds the {other:?} split but not the {split:?} split this command needs (looked for {missing})", dir.display());
    }
    load_image_folder(&dir, size, channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_roundtrip_and_errors() {
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        b.extend([0u8, 255, 10, 20, 30, 40, 1, 2, 3, 4, 5, 6]);
        let s = parse_idx_images(&b, Path::new("x.idx")).unwrap();
        assert_eq!((s.len, s.height, s.width, s.channels), (2, 2, 3, 1));
        let t = s.batch(&[0], &[true], &Device::Cpu).unwrap();
        // Row 0 of image 0 is [0, 255, 10]; flipped it reads [10, 255, 0], scaled p / 127.5 - 1.
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - (10.0 / 127.5 - 1.0)).abs() < 1e-7 && v[1] == 1.0 && v[2] == -1.0);
        let err = parse_idx_images(&b[..20], Path::new("x.idx")).unwrap_err().to_string();
        assert!(err.contains("x.idx") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn idx_sizes_that_overflow_or_expand_past_the_header_are_bounded() {
        // issue 22: a header whose N H W product overflows printed a wrapped byte count; an 8 MB .gz
        // expanding to 8 GiB was read whole before failing
        let header = |n: u32, h: u32, w: u32| [0x0803u32, n, h, w].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<u8>>();
        let err = parse_idx_images(&header(u32::MAX, u32::MAX, u32::MAX), Path::new("big.idx")).unwrap_err().to_string();
        assert!(err.contains("big.idx") && err.contains("4294967295 images of 4294967295x4294967295") && err.contains("more than"), "{err}");
        // a .gz declaring 2 images of 2x2 followed by 64 MiB of zeros: only the declared 8 bytes are read
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bomb-idx3-ubyte.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &header(2, 2, 2)).unwrap();
        for _ in 0..64 {
            std::io::Write::write_all(&mut gz, &vec![7u8; 1 << 20]).unwrap();
        }
        gz.finish().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20, "the bomb is small on disk");
        let set = read_idx_file(&path).unwrap();
        assert_eq!((set.len, set.height, set.width, set.pixels.len()), (2, 2, 2, 8));
    }

    #[test]
    #[cfg(unix)]
    fn image_folders_read_regular_files_once_and_follow_no_link_out_or_around() {
        // issue 22, item 7: a FIFO named x.png hung training forever; a link loop counted the images
        // several times and a link to the parent read the parent folder
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("images");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let png = image::GrayImage::from_pixel(4, 4, image::Luma([200u8]));
        png.save(dir.join("a.png")).unwrap();
        png.save(dir.join("sub").join("b.png")).unwrap();
        png.save(tmp.path().join("outside.png")).unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("sub").join("loop")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), dir.join("parent")).unwrap();
        std::os::unix::fs::symlink(dir.join("a.png"), dir.join("again.png")).unwrap();
        let fifo = std::process::Command::new("mkfifo").arg(dir.join("x.png")).status();
        let set = load_image_folder(&dir, 4, 1).unwrap();
        assert_eq!(set.len, 2, "a.png and sub/b.png, once each");
        if fifo.is_ok_and(|s| s.success()) {
            assert!(dir.join("x.png").exists());
        }
    }

    #[test]
    fn a_folder_with_only_the_other_split_names_the_missing_file() {
        // issue 22: `eval` on a folder with only the training IDX said "no usable image found"
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9]).unwrap();
        assert_eq!(load(tmp.path().to_str().unwrap(), Split::Train, 28, 1).unwrap().len, 1);
        let err = load(tmp.path().to_str().unwrap(), Split::Test, 28, 1).unwrap_err().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte") && err.contains("Test"), "{err}");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(100, &mut NoiseRng::new(3));
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
