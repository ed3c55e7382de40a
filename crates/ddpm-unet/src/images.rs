//! Generated images as pixels: the model's [-1, 1] samples to [0, 1] as diffusers' pipelines return
//! them, [0, 1] to 8-bit values as diffusers' `numpy_to_pil` rounds them, and (with the `image`
//! feature, on by default) to `image` crate images and PNG files.
//!
//! ```no_run
//! # fn main() -> ddpm_unet::Result<()> {
//! # let images = candle_core::Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! // `images`: (N, C, H, W) in [0, 1], as DdpmPipeline::generate returns them
//! let paths = ddpm_unet::images::save_pngs(&images, "out", "sample")?; // out/sample_0000.png, ...
//! # Ok(()) }
//! ```

#[cfg(feature = "image")]
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "image")]
use crate::error::Error;
use crate::error::Result;

/// Maps model samples in [-1, 1] to images in [0, 1] as diffusers' DDPMPipeline and DDIMPipeline
/// do, in f32: `(x / 2 + 0.5).clamp(0, 1)`.
pub fn to_unit_range(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    // x / 2 + 0.5, then clamped to [0, 1]
    Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// 8-bit pixel values of images in [0, 1], in the tensor's own element order (moved to the CPU):
/// `round(x * 255)` with ties to even, as numpy's `round` in diffusers' `numpy_to_pil`
/// (`(images * 255).round().astype("uint8")`); values outside [0, 1] are clamped first.
pub fn to_u8(images: &Tensor) -> Result<Vec<u8>> {
    let v = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // (x * 255).round(), in f32 as numpy computes it on a float32 array
    Ok(v.into_iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255f32).round_ties_even() as u8)
        .collect())
}

/// The pixels of one image (C, H, W) in [0, 1] interleaved as H, W, C rows (the layout of PNG and of
/// diffusers' numpy output), with `C` as returned.
pub fn to_hwc_u8(image: &Tensor) -> Result<(Vec<u8>, usize, usize, usize)> {
    let (c, h, w) = image.dims3()?;
    let px = to_u8(&image.permute((1, 2, 0))?)?;
    Ok((px, c, h, w))
}

/// One image (C, H, W) in [0, 1] as an `image` crate image: greyscale (`L`, as diffusers' PIL
/// output for one channel) when C is 1, RGB when C is 3.
#[cfg(feature = "image")]
pub fn to_image(image: &Tensor) -> Result<image::DynamicImage> {
    let (px, c, h, w) = to_hwc_u8(image)?;
    let (w32, h32) = (w as u32, h as u32);
    let bad = || {
        Error::InvalidArgument(format!(
            "cannot make an image of {c} channels, {h}x{w} (need 1 or 3 channels)"
        ))
    };
    match c {
        1 => image::GrayImage::from_raw(w32, h32, px)
            .map(image::DynamicImage::ImageLuma8)
            .ok_or_else(bad),
        3 => image::RgbImage::from_raw(w32, h32, px)
            .map(image::DynamicImage::ImageRgb8)
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// One image (C, H, W) in [0, 1] as 8-bit RGB; a greyscale image's one channel is repeated.
#[cfg(feature = "image")]
pub fn to_rgb8(image: &Tensor) -> Result<image::RgbImage> {
    Ok(to_image(image)?.to_rgb8())
}

/// Writes one image (C, H, W) in [0, 1] as a PNG file (greyscale for 1 channel, RGB for 3),
/// through a temporary name beside `path` renamed into place.
#[cfg(feature = "image")]
pub fn save_png(image: &Tensor, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let img = to_image(image)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = img
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            source: e,
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes each image of a batch (N, C, H, W) in [0, 1] as `dir/{prefix}_{i:04}.png` (creating `dir`),
/// and returns the paths in batch order.
#[cfg(feature = "image")]
pub fn save_pngs(images: &Tensor, dir: impl AsRef<Path>, prefix: &str) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let n = images.dims4()?.0;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{prefix}_{i:04}.png"));
            save_png(&images.get(i)?, &p)?;
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_numpy_round_half_to_even() {
        let x = Tensor::new(
            &[0f32, 1.0, 0.5, 1.5 / 255.0, 2.5 / 255.0, -0.1, 1.2],
            &Device::Cpu,
        )
        .unwrap();
        // 0.5 * 255 = 127.5 -> 128 (even); (1.5 / 255) * 255 -> 1.5 -> 2 and 2.5 -> 2 (ties to even,
        // where rounding half away from zero gives 3); outside [0, 1] clamped
        assert_eq!(to_u8(&x).unwrap(), vec![0, 255, 128, 2, 2, 0, 255]);
    }
}
