//! A bounded reader for PyTorch's `torch.save` files (`.bin`, `.pt`, `.pth`) holding a state dict.
//!
//! Since PyTorch 1.6 `torch.save` writes a zip archive: `ARCHIVE/data.pkl`, a pickle of the state
//! dict in which each tensor is `_rebuild_tensor_v2(storage, offset, size, stride, ...)` and each
//! storage a persistent id `('storage', torch.FloatStorage, KEY, location, numel)`, and one entry
//! `ARCHIVE/data/KEY` per storage holding its raw little-endian bytes. This reader runs no code: the
//! pickle goes through [`machine`], which knows only the handful of opcodes and globals a state dict
//! uses; the storages are read only after each view has been checked against its entry.
//!
//! Bounds. Let `F` be the file's size in bytes. Nothing is allocated from a size the file declares
//! before that size has been checked against the archive, with checked arithmetic:
//! - the zip reader keeps one record (232 bytes) per central-directory entry and accepts at most one
//!   entry per 46 bytes of the file: its index takes at most about 5 F;
//! - the pickle entry must be stored (uncompressed, as torch writes it) and at most
//!   `min(F, 64 MiB)` bytes; the machine then holds at most 128 times the pickle's size, its
//!   largest single allocation at most 48 times (see [`machine`]), and never recurses;
//! - a storage entry must be stored, hold exactly `numel * element size` bytes, and the storages
//!   read must total at most `F` (entries of a well-formed archive do not overlap), so a crafted
//!   central directory cannot make one byte of the file count twice;
//! - each view must lie inside its storage: `offset + sum((size_i - 1) * stride_i) < numel`;
//! - the tensors built must total at most [`OUTPUT_FACTOR`]` * F` bytes (views sharing a storage,
//!   or a stride-0 broadcast, are each materialised).
//!
//! So reading a file allocates at most about `(5 + 1 + 128 + 1 + OUTPUT_FACTOR) F = 139 F` bytes
//! plus a constant, and its largest single allocation is at most `48 F` (the machine's stack; the
//! zip index, a storage or a tensor take at most 5 F, F and 4 F). Every failure is a one-line
//! [`Error::Weights`] naming the file and, when known, the tensor's key.

pub mod machine;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor, WithDType};
use zip::{CompressionMethod, ZipArchive};

use crate::error::{Error, Result};
use machine::TensorMeta;

/// Largest pickle (`data.pkl`) accepted: a state dict of 100,000 tensors is about 10 MB.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The tensors built from a file may total at most this many times the file's size.
pub const OUTPUT_FACTOR: u64 = 4;

/// Reads the state dict of the `torch.save` zip archive at `path`: its tensors in the order of the
/// file, on the CPU, in the dtypes stored (f32, f16, bf16, f64, i64, u8). Views (transposes,
/// slices with a storage offset) come out as contiguous tensors with the view's values.
pub fn read_state_dict(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    read(path).map_err(|reason| Error::Weights {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(one_line(&reason)),
    })
}

/// `s` with line breaks replaced by spaces (a zip error's text, for instance).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The archive being read, with the bytes its storages may still take.
struct Archive {
    zip: ZipArchive<BufReader<File>>,
    /// Size of the whole file.
    file_len: u64,
    /// `ARCHIVE/`, the folder of `data.pkl`.
    prefix: String,
    /// Bytes of storage entries read so far (at most `file_len`).
    read_total: u64,
}

fn read(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let zip = ZipArchive::new(BufReader::new(file)).map_err(|e| {
        format!("not a torch.save zip archive (the format of PyTorch 1.6 and later): {e}")
    })?;
    let prefix = pickle_prefix(&zip)?;
    let mut ar = Archive {
        zip,
        file_len,
        prefix,
        read_total: 0,
    };
    ar.check_byteorder()?;
    let pkl_name = format!("{}data.pkl", ar.prefix);
    let pickle = ar.entry(&pkl_name, MAX_PICKLE_BYTES.min(file_len))?;
    let metas = machine::read_state_dict(&pickle)?;
    drop(pickle);

    let mut storages: HashMap<String, (machine::StorageRef, Vec<u8>)> = HashMap::new();
    let mut seen = HashSet::new();
    let mut out_total = 0u64;
    let out_limit = file_len.saturating_mul(OUTPUT_FACTOR);
    let mut out = Vec::with_capacity(metas.len());
    for (key, meta) in metas {
        if !seen.insert(key.clone()) {
            return Err(format!("tensor `{key}` appears twice in the state dict"));
        }
        let t = ar
            .tensor(&meta, &mut storages, &mut out_total, out_limit)
            .map_err(|e| format!("tensor `{key}`: {e}"))?;
        out.push((key, t));
    }
    Ok(out)
}

/// `ARCHIVE/`: the folder of the archive's one `ARCHIVE/data.pkl` (torch names it after the file).
fn pickle_prefix(zip: &ZipArchive<BufReader<File>>) -> std::result::Result<String, String> {
    let mut found = None;
    for name in zip.file_names_raw() {
        let Some(prefix) = name.strip_suffix(b"data.pkl") else {
            continue;
        };
        let one_folder = prefix.is_empty()
            || (prefix.ends_with(b"/") && !prefix[..prefix.len() - 1].contains(&b'/'));
        if !one_folder {
            continue;
        }
        if found.is_some() {
            return Err("the archive holds more than one data.pkl".into());
        }
        let prefix = std::str::from_utf8(prefix)
            .map_err(|_| "the archive's folder name is not UTF-8".to_string())?;
        found = Some(prefix.to_string());
    }
    found.ok_or_else(|| "the archive has no data.pkl: not a torch.save file".into())
}

impl Archive {
    /// torch writes `ARCHIVE/byteorder` ("little" or "big"); older files omit it (little-endian).
    fn check_byteorder(&mut self) -> std::result::Result<(), String> {
        let name = format!("{}byteorder", self.prefix);
        if self.zip.index_for_name(&name).is_none() {
            return Ok(());
        }
        let b = self.entry(&name, 16)?;
        if b != b"little" {
            return Err(format!(
                "byteorder is {:?}; only little-endian files are read",
                String::from_utf8_lossy(&b)
            ));
        }
        Ok(())
    }

    /// The bytes of entry `name`, which must be stored uncompressed and hold at most `max` bytes;
    /// nothing is allocated before that is checked. The zip reader checks the entry's CRC-32.
    fn entry(&mut self, name: &str, max: u64) -> std::result::Result<Vec<u8>, String> {
        let mut f = self
            .zip
            .by_name(name)
            .map_err(|e| format!("entry `{name}`: {e}"))?;
        if f.compression() != CompressionMethod::Stored {
            return Err(format!(
                "entry `{name}` is compressed ({}); torch.save stores entries uncompressed",
                f.compression()
            ));
        }
        let size = f.size();
        if size != f.compressed_size() {
            return Err(format!(
                "entry `{name}` is stored but declares {size} bytes unpacked and {} packed",
                f.compressed_size()
            ));
        }
        if size > max {
            return Err(format!(
                "entry `{name}` declares {size} bytes, more than the {max} allowed here"
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| format!("entry `{name}`: {e}"))?;
        if buf.len() as u64 != size {
            return Err(format!(
                "entry `{name}` holds {} bytes, not the {size} declared",
                buf.len()
            ));
        }
        Ok(buf)
    }

    /// Builds the tensor `meta` describes. Checked first, without allocating: the storage's
    /// `numel * element size` against its entry's size, the view against the storage, the tensors'
    /// total against the output bound; then the storage is read on first use (each storage once,
    /// all of them together at most the file's size).
    fn tensor(
        &mut self,
        meta: &TensorMeta,
        storages: &mut HashMap<String, (machine::StorageRef, Vec<u8>)>,
        out_total: &mut u64,
        out_limit: u64,
    ) -> std::result::Result<Tensor, String> {
        let s = &*meta.storage;
        let elem = s.dtype.size_in_bytes() as u64;
        let view = View::check(meta)?;
        let name = format!("{}data/{}", self.prefix, s.key);
        match storages.get(&s.key) {
            Some((first, _)) if first.dtype != s.dtype || first.numel != s.numel => {
                return Err(format!(
                    "storage `{}` is declared as {} {:?} elements and as {} {:?} elements",
                    s.key, first.numel, first.dtype, s.numel, s.dtype
                ));
            }
            Some(_) => {}
            None => {
                // storage bytes = numel * element size, which the entry must hold exactly
                let want = s
                    .numel
                    .checked_mul(elem)
                    .ok_or_else(|| format!("storage `{}` size overflows", s.key))?;
                let size = self.entry_size(&name)?;
                if size != want {
                    return Err(format!(
                        "storage `{}` declares {} {:?} elements ({want} bytes) but entry `{name}` holds {size} bytes",
                        s.key, s.numel, s.dtype
                    ));
                }
            }
        }
        // the last element the view reads lies inside the storage
        if view.numel > 0 && view.last >= s.numel {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {} of a storage of {}",
                meta.offset, meta.shape, meta.stride, view.last, s.numel
            ));
        }
        // the tensor's bytes, numel * element size, counted against the output bound
        let bytes = view
            .numel
            .checked_mul(elem)
            .ok_or("tensor size overflows")?;
        *out_total = out_total.saturating_add(bytes);
        if *out_total > out_limit {
            return Err(format!(
                "the tensors would take more than {OUTPUT_FACTOR} times the file's size ({out_limit} bytes)"
            ));
        }
        if view.numel == 0 {
            return build(&view, &[], s.dtype);
        }
        if !storages.contains_key(&s.key) {
            let size = s.numel * elem; // checked above against the entry
            if size > self.file_len - self.read_total {
                return Err(format!(
                    "storage entries total more than the file's {} bytes",
                    self.file_len
                ));
            }
            let data = self.entry(&name, size)?;
            self.read_total += size;
            storages.insert(s.key.clone(), (s.clone(), data));
        }
        build(&view, &storages[&s.key].1, s.dtype)
    }

    /// The declared (uncompressed) size of entry `name`, without reading it.
    fn entry_size(&mut self, name: &str) -> std::result::Result<u64, String> {
        let f = self
            .zip
            .by_name(name)
            .map_err(|e| format!("entry `{name}`: {e}"))?;
        Ok(f.size())
    }
}

/// A view checked for overflow: shape and strides as `usize` (strides of size-1 dimensions set to
/// 0, as they address nothing), its element count and the last storage element it reads.
struct View {
    shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    numel: u64,
    /// `offset + sum((size_i - 1) * stride_i)`.
    last: u64,
}

impl View {
    fn check(meta: &TensorMeta) -> std::result::Result<View, String> {
        let overflow = || {
            format!(
                "size {:?}, stride {:?}, offset {} overflow",
                meta.shape, meta.stride, meta.offset
            )
        };
        // the product of the non-zero sizes must fit, so that every partial product of the sizes
        // (candle's element count and contiguous strides) does, even for an empty tensor
        let nonzero = meta
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        // numel = prod(size_i)
        let numel = if meta.shape.contains(&0) { 0 } else { nonzero };
        // last = offset + sum((size_i - 1) * stride_i), over non-empty views
        let mut last = meta.offset;
        if numel > 0 {
            for (&d, &s) in meta.shape.iter().zip(&meta.stride) {
                last = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(overflow)?;
            }
        }
        let usize_of = |x: u64| usize::try_from(x).map_err(|_| overflow());
        let shape = meta
            .shape
            .iter()
            .map(|&d| usize_of(d))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let stride = meta
            .shape
            .iter()
            .zip(&meta.stride)
            .map(|(&d, &s)| if d == 1 { Ok(0) } else { usize_of(s) })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(View {
            shape,
            stride,
            offset: usize_of(meta.offset)?,
            numel,
            last,
        })
    }

    /// Row-major contiguous: each stride is the product of the later sizes (size-1 dims aside).
    fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect = expect.saturating_mul(d);
        }
        true
    }

    /// Calls `f` with the storage index of each element, in row-major order of the view (an
    /// odometer over the indices; every index is at most `last`, which was checked).
    fn for_each_index(&self, mut f: impl FnMut(usize)) {
        let rank = self.shape.len();
        let mut idx = vec![0usize; rank];
        let mut cur = self.offset;
        for _ in 0..self.numel {
            f(cur);
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    cur += self.stride[d];
                    break;
                }
                cur -= self.stride[d] * (self.shape[d] - 1);
                idx[d] = 0;
            }
        }
    }
}

/// The view's values as a contiguous CPU tensor of `dtype`, decoded from little-endian `data`.
fn build(view: &View, data: &[u8], dtype: DType) -> std::result::Result<Tensor, String> {
    fn gather<T: WithDType, const N: usize>(
        view: &View,
        data: &[u8],
        decode: fn([u8; N]) -> T,
    ) -> candle_core::Result<Tensor> {
        let at = |i: usize| {
            let mut a = [0u8; N];
            a.copy_from_slice(&data[i * N..(i + 1) * N]);
            decode(a)
        };
        let n = view.numel as usize;
        let values: Vec<T> = if view.is_contiguous() {
            (view.offset..view.offset + n).map(at).collect()
        } else {
            let mut v = Vec::with_capacity(n);
            view.for_each_index(|i| v.push(at(i)));
            v
        };
        Tensor::from_vec(values, view.shape.as_slice(), &Device::Cpu)
    }
    let t = match dtype {
        DType::F32 => gather(view, data, f32::from_le_bytes),
        DType::F16 => gather(view, data, half::f16::from_le_bytes),
        DType::BF16 => gather(view, data, half::bf16::from_le_bytes),
        DType::F64 => gather(view, data, f64::from_le_bytes),
        DType::I64 => gather(view, data, i64::from_le_bytes),
        DType::U8 => gather(view, data, u8::from_le_bytes),
        other => return Err(format!("dtype {other:?} is not supported")),
    };
    t.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(shape: &[u64], stride: &[u64], offset: u64) -> View {
        let storage = std::rc::Rc::new(machine::StorageRef {
            key: "0".into(),
            dtype: DType::F32,
            numel: 100,
        });
        View::check(&TensorMeta {
            storage,
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        })
        .unwrap()
    }

    fn indices(v: &View) -> Vec<usize> {
        let mut out = vec![];
        v.for_each_index(|i| out.push(i));
        out
    }

    #[test]
    fn transposed_view_walks_columns() {
        // a 3x4 row-major matrix seen as its 4x3 transpose: element (i, j) is storage[j * 4 + i]
        let v = view(&[4, 3], &[1, 4], 0);
        assert!(!v.is_contiguous());
        assert_eq!(indices(&v), vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert_eq!(v.last, 11);
    }

    #[test]
    fn sliced_view_starts_at_its_offset() {
        // rows 1.. and columns 2.. of a 3x4 matrix: offset 1 * 4 + 2 = 6
        let v = view(&[2, 2], &[4, 1], 6);
        assert_eq!(indices(&v), vec![6, 7, 10, 11]);
        assert_eq!(v.last, 11);
    }

    #[test]
    fn size_one_dims_ignore_their_stride() {
        let v = view(&[1, 3], &[999, 1], 2);
        assert!(v.is_contiguous());
        assert_eq!(v.last, 4);
    }

    #[test]
    fn empty_tensors_with_overflowing_sizes_are_errors() {
        // numel is 0, but candle multiplies the sizes (element count, strides) and would overflow
        let storage = std::rc::Rc::new(machine::StorageRef {
            key: "0".into(),
            dtype: DType::F32,
            numel: 0,
        });
        for shape in [vec![0, u64::MAX, 2], vec![1 << 32, 1 << 32, 0]] {
            let meta = TensorMeta {
                storage: storage.clone(),
                offset: 0,
                shape,
                stride: vec![0, 0, 0],
            };
            assert!(View::check(&meta).is_err());
        }
        let ok = view(&[0, 3], &[3, 1], 0);
        assert_eq!(ok.numel, 0);
    }

    #[test]
    fn overflowing_views_are_errors() {
        let storage = std::rc::Rc::new(machine::StorageRef {
            key: "0".into(),
            dtype: DType::F32,
            numel: 1,
        });
        let meta = TensorMeta {
            storage,
            offset: 0,
            shape: vec![u64::MAX, 2],
            stride: vec![1, 1],
        };
        assert!(View::check(&meta).is_err());
    }
}
