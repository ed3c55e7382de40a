//! Named datasets from the Hugging Face Hub: the parquet files of each dataset's
//! `refs/convert/parquet` branch (the files candle-datasets reads), taken from the local Hub cache when
//! they are there and downloaded into it otherwise, unless `HF_HUB_OFFLINE` is set.
//!
//! candle-datasets' own loaders ask the network before the cache, stop the process on an image they
//! cannot decode and lay CIFAR-10 pixels out as H, W, C under a C, H, W shape; the same files are read
//! here with the parquet crate instead, each image decoded with `image` and converted to C, H, W.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ddpm_unet::hub::{self, HubOptions};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::data::{ImageSet, Split};

/// The Hub branch that holds the parquet conversion of every dataset.
pub const REVISION: &str = "refs/convert/parquet";

/// A dataset that `--data NAME` can fetch from the Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubDataset {
    /// The name given to `--data`.
    pub name: &'static str,
    /// The Hub repo id, `owner/name`.
    pub repo_id: &'static str,
    /// The dataset config: the folder that holds the split folders on the parquet branch.
    pub config: &'static str,
    /// Channels of its images (1 or 3).
    pub channels: usize,
    /// Height and width of its images.
    pub size: usize,
}

/// The named datasets, with the repos and configs candle-datasets uses.
pub const HUB_DATASETS: &[HubDataset] = &[
    HubDataset { name: "mnist", repo_id: "ylecun/mnist", config: "mnist", channels: 1, size: 28 },
    HubDataset { name: "fashion-mnist", repo_id: "zalando-datasets/fashion_mnist", config: "fashion_mnist", channels: 1, size: 28 },
    HubDataset { name: "cifar10", repo_id: "uoft-cs/cifar10", config: "plain_text", channels: 3, size: 32 },
];

/// The Hub dataset called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static HubDataset> {
    HUB_DATASETS.iter().find(|d| d.name == name)
}

impl HubDataset {
    /// The parquet file of `split`, relative to the repo root: `config/train/0000.parquet`.
    pub fn file(&self, split: Split) -> String {
        let s = match split {
            Split::Train => "train",
            Split::Test => "test",
        };
        format!("{}/{s}/0000.parquet", self.config)
    }

    /// The repo's owner and name.
    pub fn owner_and_name(&self) -> Result<(&'static str, &'static str)> {
        Ok(hub::parse_repo_id(self.repo_id)?)
    }

    /// The cache folder of the repo: `cache_dir/datasets--owner--name`.
    pub fn cache_folder(&self, cache_dir: &Path) -> Result<PathBuf> {
        let (owner, name) = self.owner_and_name()?;
        Ok(hub::cache_folder(cache_dir, "datasets", owner, name))
    }
}

/// The local path of `split`'s parquet file: from the cache, else downloaded (unless offline).
pub fn fetch(d: &HubDataset, split: Split, opts: &HubOptions) -> Result<PathBuf> {
    let file = d.file(split);
    let (owner, name) = d.owner_and_name()?;
    let client = hub::client(&opts.cache_dir).map_err(|e| anyhow::anyhow!("dataset `{}`: cannot start the Hub client: {e}", d.name))?;
    let repo = client.dataset(owner, name);
    let get = |local_only: bool| repo.download_file().filename(&file).revision(REVISION).local_files_only(local_only).send();
    if let Ok(p) = get(true) {
        return Ok(p);
    }
    let cached = d.cache_folder(&opts.cache_dir)?;
    if opts.offline {
        bail!(
            "dataset `{}`: not in data/{} and {file} is not in the Hub cache ({}); HF_HUB_OFFLINE is set, so it was not downloaded",
            d.name,
            d.name,
            cached.display()
        );
    }
    eprintln!("downloading {file} of the Hub dataset {} ({REVISION}) into {}", d.repo_id, cached.display());
    get(false).map_err(|e| {
        anyhow::anyhow!(
            "dataset `{}`: not in data/{} nor in the Hub cache ({}), and the download of {file} from https://huggingface.co/datasets/{} failed: {e}",
            d.name,
            d.name,
            cached.display(),
            d.repo_id
        )
    })
}

/// The encoded image bytes of a row: the first column that is an image struct (`{bytes, path}`) or a
/// plain byte array.
fn image_bytes(row: &parquet::record::Row) -> Option<&[u8]> {
    row.get_column_iter().find_map(|(_, field)| match field {
        Field::Group(g) => g.get_column_iter().find_map(|(k, f)| match f {
            Field::Bytes(b) if k == "bytes" => Some(b.data()),
            _ => None,
        }),
        Field::Bytes(b) => Some(b.data()),
        _ => None,
    })
}

/// The integer `label` column of a row, if it has one that fits a byte.
fn label(row: &parquet::record::Row) -> Option<u8> {
    row.get_column_iter().find_map(|(k, f)| match f {
        Field::Long(v) if k == "label" => u8::try_from(*v).ok(),
        Field::Int(v) if k == "label" => u8::try_from(*v).ok(),
        _ => None,
    })
}

/// Reads every image of a Hub parquet file, converted to `channels` (1 or 3) and `size` x `size`
/// (resized and centre-cropped when they differ). Rows without a decodable image are skipped with a
/// warning and counted; a file with no usable image is an error.
pub fn read_parquet_images(path: &Path, size: usize, channels: usize) -> Result<ImageSet> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let rows = reader.get_row_iter(None).with_context(|| format!("{}: cannot read the rows", path.display()))?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    let (mut ok, mut skipped) = (0usize, 0usize);
    for (i, row) in rows.enumerate() {
        let row = row.with_context(|| format!("{}: row {i} cannot be read", path.display()))?;
        let decoded = image_bytes(&row).ok_or_else(|| "no image column".to_string()).and_then(|b| image::load_from_memory(b).map_err(|e| e.to_string()));
        match decoded {
            Ok(img) => {
                pixels.extend(crate::imageio::to_chw(&img, size, channels));
                labels.push(label(&row));
                ok += 1;
            }
            Err(e) => {
                if skipped < 5 {
                    eprintln!("warning: {}: skipping row {i}: {e}", path.display());
                }
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} row(s) without a readable image skipped in {}", path.display());
    }
    if ok == 0 {
        bail!("{}: no usable image found in the parquet rows", path.display());
    }
    // the labels only where every kept row has one in 0..=255
    let labels = labels.into_iter().collect::<Option<Vec<u8>>>().unwrap_or_default();
    Ok(ImageSet { pixels, len: ok, channels, height: size, width: size, source: path.display().to_string(), labels })
}

/// Loads `split` of the Hub dataset `d` at its own size and channels (cache first, then the network
/// unless offline).
pub fn load(d: &HubDataset, split: Split, opts: &HubOptions) -> Result<ImageSet> {
    read_parquet_images(&fetch(d, split, opts)?, d.size, d.channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fake Hub cache written by `scripts/make_hub_data_fixtures.py`.
    fn fixture_cache() -> HubOptions {
        let cache_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hub_cache");
        HubOptions { cache_dir, offline: true }
    }

    #[test]
    fn fashion_mnist_from_the_cache_skips_a_bad_row() {
        let d = find("fashion-mnist").unwrap();
        let set = load(d, Split::Train, &fixture_cache()).unwrap();
        // 7 rows, the last of which is not an image.
        assert_eq!((set.len, set.channels, set.height, set.width), (6, 1, 28, 28));
        for k in 0..6 {
            let img = set.image(k);
            for (y, x) in [(0, 0), (5, 17), (27, 27)] {
                assert_eq!(img[y * 28 + x] as usize, (7 * k + 3 * y + x) % 256, "image {k} at ({y}, {x})");
            }
        }
        assert_eq!(load(d, Split::Test, &fixture_cache()).unwrap().len, 3);
    }

    #[test]
    fn cifar10_pixels_come_out_channel_first() {
        let set = load(find("cifar10").unwrap(), Split::Train, &fixture_cache()).unwrap();
        assert_eq!((set.len, set.channels, set.height, set.width), (4, 3, 32, 32));
        for k in 0..4 {
            let img = set.image(k);
            for (y, x) in [(0, 1), (3, 30), (31, 2)] {
                // R = 8 x, G = 8 y, B = 40 k in the written images
                let at = |c: usize| img[(c * 32 + y) * 32 + x] as usize;
                assert_eq!((at(0), at(1), at(2)), (8 * x, 8 * y, 40 * k), "image {k} at ({y}, {x})");
            }
        }
    }

    #[test]
    fn offline_and_not_cached_is_one_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = HubOptions { cache_dir: tmp.path().to_path_buf(), offline: true };
        let e = load(find("mnist").unwrap(), Split::Train, &opts).unwrap_err().to_string();
        assert!(e.contains("mnist/train/0000.parquet") && e.contains("datasets--ylecun--mnist") && e.contains("HF_HUB_OFFLINE"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_file_that_is_not_parquet_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("0000.parquet");
        std::fs::write(&p, b"PAR1 but not really").unwrap();
        let e = format!("{:#}", read_parquet_images(&p, 28, 1).unwrap_err());
        assert!(e.contains("0000.parquet") && e.contains("not a readable parquet file"), "{e}");
    }
}
