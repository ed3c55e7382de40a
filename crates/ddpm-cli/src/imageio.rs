//! Images in and out: tensors in [-1, 1] to PNG grids, strips and GIF animations, written atomically;
//! image files to pixels for training and interpolation.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GenericImageView, RgbImage};

/// Converts an image to `channels` (1 grey or 3 RGB), resizes its short side to `size` and centre-crops
/// to `size` x `size`; returns the pixels in C, H, W order.
pub fn to_chw(img: &DynamicImage, size: usize, channels: usize) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let s = size as u32;
    let img = if (w, h) == (s, s) {
        img.clone()
    } else {
        // Scale so that the short side is `size`, then cut the centre square.
        let scale = s as f64 / w.min(h) as f64;
        let (nw, nh) = (((w as f64 * scale).round() as u32).max(s), ((h as f64 * scale).round() as u32).max(s));
        img.resize_exact(nw, nh, FilterType::Triangle).crop_imm((nw - s) / 2, (nh - s) / 2, s, s)
    };
    if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        let rgb = img.to_rgb8();
        let mut out = vec![0u8; 3 * size * size];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * size * size + i] = p[c];
            }
        }
        out
    }
}

/// Pixel values of a tensor in [-1, 1], in its own element order, as diffusers' pipelines make them
/// (ddpm_unet::images): (x / 2 + 0.5) clamped to [0, 1], then round(255 v) with ties to even.
fn to_u8(t: &Tensor) -> Result<Vec<u8>> {
    Ok(ddpm_unet::images::to_u8(&ddpm_unet::images::to_unit_range(t)?)?)
}

/// Number of columns of a near-square grid of `n` images: ceil(sqrt(n)).
pub fn grid_cols(n: usize) -> usize {
    (n as f64).sqrt().ceil().max(1.0) as usize
}

/// Lays out a (N, C, H, W) batch in [-1, 1] as one RGB image of `cols` columns with a 2-pixel border.
pub fn grid_image(batch: &Tensor, cols: usize) -> Result<RgbImage> {
    let (n, c, h, w) = batch.dims4()?;
    if c != 1 && c != 3 {
        bail!("cannot draw images with {c} channels (need 1 or 3)");
    }
    let px = to_u8(batch)?;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut img = RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for k in 0..n {
        let (gx, gy) = (pad + (k % cols) * (w + pad), pad + (k / cols) * (h + pad));
        let base = k * c * h * w;
        for y in 0..h {
            for x in 0..w {
                let v = |ch: usize| px[base + (ch * h + y) * w + x];
                let rgb = if c == 1 { [v(0); 3] } else { [v(0), v(1), v(2)] };
                img.put_pixel((gx + x) as u32, (gy + y) as u32, image::Rgb(rgb));
            }
        }
    }
    Ok(img)
}

/// One image of a batch (C, H, W in [-1, 1]) as an image, greyscale when C is 1.
pub fn single_image(img: &Tensor) -> Result<DynamicImage> {
    let (c, h, w) = img.dims3()?;
    let px = to_u8(img)?;
    let out = if c == 1 {
        DynamicImage::ImageLuma8(image::GrayImage::from_raw(w as u32, h as u32, px).context("image buffer size")?)
    } else {
        let mut hwc = vec![0u8; h * w * 3];
        for i in 0..h * w {
            for ch in 0..3 {
                hwc[i * 3 + ch] = px[ch * h * w + i];
            }
        }
        DynamicImage::ImageRgb8(RgbImage::from_raw(w as u32, h as u32, hwc).context("image buffer size")?)
    };
    Ok(out)
}

/// Checks that the folder an output file goes into exists, so that a long run does not fail at its end.
pub fn check_parent(path: &Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{}: the folder {} does not exist; create it first or choose another path", path.display(), parent.display());
    }
    Ok(())
}

/// Checks, before a long run, that an output file can be written at `path`: it is not a folder, its
/// folder exists, and a file can be created there (a temporary file beside it is created and removed).
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{}: is a folder; give a file name (such as {}/grid.png)", path.display(), path.display());
    }
    check_parent(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let probe = path.with_file_name(format!(".{name}.tmp"));
    std::fs::File::create(&probe).map_err(|e| anyhow::anyhow!("{}: cannot write there: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes `bytes` through `write` to a temporary file beside `path`, then renames it into place, so that
/// a failure never leaves a partial file under the final name.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_parent(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))
}

/// Saves an image as PNG atomically.
pub fn save_png(img: &DynamicImage, path: &Path) -> Result<()> {
    write_atomic(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png).with_context(|| format!("{}: cannot write PNG", path.display()))
    })
}

/// Saves a batch as a near-square grid PNG.
pub fn save_grid(batch: &Tensor, path: &Path) -> Result<()> {
    save_grid_scaled(batch, 1, path)
}

/// Saves a batch as one near-square grid PNG, each pixel drawn as a `scale` x `scale` block
/// (nearest-neighbour enlargement, so that 28x28 digits are visible at a glance).
pub fn save_grid_scaled(batch: &Tensor, scale: u32, path: &Path) -> Result<()> {
    let n = batch.dim(0)?;
    let grid = grid_image(batch, grid_cols(n))?;
    let grid = if scale > 1 { image::imageops::resize(&grid, grid.width() * scale, grid.height() * scale, image::imageops::FilterType::Nearest) } else { grid };
    save_png(&DynamicImage::ImageRgb8(grid), path)
}

/// Saves frames (each an RGB image of equal size) as a looping GIF animation, `delay_ms` per frame.
pub fn save_gif(frames: Vec<RgbImage>, delay_ms: u32, path: &Path) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut enc = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 10);
        enc.set_repeat(Repeat::Infinite)?;
        let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
        for f in frames {
            let rgba = DynamicImage::ImageRgb8(f).to_rgba8();
            enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .with_context(|| format!("{}: cannot write GIF frame", path.display()))?;
        }
        Ok(())
    })
}

/// Reads an image file for the model: it must already be `size` x `size`; converted to `channels`; returns
/// a (1, C, H, W) tensor in [-1, 1].
pub fn load_for_model(path: &Path, size: usize, channels: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    let (w, h) = img.dimensions();
    if (w as usize, h as usize) != (size, size) {
        bail!("{}: image is {w}x{h}, the model takes {size}x{size}; resize it first", path.display());
    }
    let px = to_chw(&img, size, channels);
    let v: Vec<f32> = px.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(v, (1, channels, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn grid_layout_and_pixel_values() {
        // 3 images of 1x2x2: values -1 (black), 0 (mid grey 128 after rounding 127.5), 1 (white).
        let t = Tensor::from_vec(vec![-1f32, -1., -1., -1., 0., 0., 0., 0., 1., 1., 1., 1.], (3, 1, 2, 2), &Device::Cpu).unwrap();
        let g = grid_image(&t, grid_cols(3)).unwrap();
        // 2 columns, 2 rows: width 2 * (2 + 2) + 2 = 10.
        assert_eq!(g.dimensions(), (10, 10));
        assert_eq!(g.get_pixel(2, 2)[0], 0);
        assert_eq!(g.get_pixel(6, 2)[0], 128);
        assert_eq!(g.get_pixel(2, 6)[0], 255);
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let r = write_atomic(&p, |tmp| {
            std::fs::write(tmp, b"partial")?;
            bail!("injected failure")
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("nope/a.png");
        let e = save_grid(&Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap(), &missing).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
