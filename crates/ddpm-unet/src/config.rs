//! [`UNetConfig`]: diffusers' `UNet2DModel` `config.json`, read and written.
//!
//! Hub configs written by old diffusers versions omit fields: a missing field takes the value that
//! `UNet2DModel.__init__` defaults to (not serde's zero), unknown fields are ignored, and a value this
//! crate cannot run (a block type it does not have, another activation, ...) is an error naming the
//! field and the value.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The diffusers version written into `config.json` (`_diffusers_version`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A down block of the UNet (one resolution level on the way down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// `layers_per_block` residual blocks, then a downsampler (except at the last level).
    DownBlock2D,
    /// Residual blocks each followed by self-attention, then a downsampler (except at the last level).
    AttnDownBlock2D,
}

/// An up block of the UNet (one resolution level on the way up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// `layers_per_block + 1` residual blocks on [hidden, skip], then an upsampler (except at the last level).
    UpBlock2D,
    /// Residual blocks each followed by self-attention, then an upsampler (except at the last level).
    AttnUpBlock2D,
}

impl DownBlockType {
    /// Whether the block has self-attention after each residual block.
    pub fn has_attention(self) -> bool {
        matches!(self, DownBlockType::AttnDownBlock2D)
    }
}

impl UpBlockType {
    /// Whether the block has self-attention after each residual block.
    pub fn has_attention(self) -> bool {
        matches!(self, UpBlockType::AttnUpBlock2D)
    }
}

/// The configuration of a diffusers `UNet2DModel` (`config.json`), restricted to what DDPM models use.
///
/// Field names and meanings are diffusers'; [`UNetConfig::default`] gives `UNet2DModel`'s constructor
/// defaults. Deserialization goes through [`UNetConfig::from_json_value`], so a missing field gets
/// that default and a bad value is reported with its field name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UNetConfig {
    /// Height and width of the images the model was trained on (`None`: not recorded).
    pub sample_size: Option<usize>,
    /// Channels of the input image.
    pub in_channels: usize,
    /// Channels of the output (the predicted noise).
    pub out_channels: usize,
    /// Whether the input is mapped x -> 2x - 1 first.
    pub center_input_sample: bool,
    /// Timestep embedding; only `"positional"` (sinusoidal) is supported.
    pub time_embedding_type: String,
    /// Width of the time embedding (`None`: 4 * `block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// Shift of the frequency denominator: freqs_i = exp(-ln(10000) i / (half - freq_shift)).
    pub freq_shift: usize,
    /// Whether the embedding is [cos, sin] (true) or [sin, cos] (false).
    pub flip_sin_to_cos: bool,
    /// Down blocks, from the highest resolution to the lowest.
    pub down_block_types: Vec<DownBlockType>,
    /// The middle block; only `"UNetMidBlock2D"` is supported.
    pub mid_block_type: String,
    /// Up blocks, from the lowest resolution to the highest.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels at each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// The middle block's residual and attention output divisor.
    pub mid_block_scale_factor: f64,
    /// Padding of the stride-2 downsampling conv; 0 pads right and bottom by one instead.
    pub downsample_padding: usize,
    /// Downsampler kind; only `"conv"` is supported.
    pub downsample_type: String,
    /// Upsampler kind; only `"conv"` (nearest x2 then a 3x3 conv) is supported.
    pub upsample_type: String,
    /// Dropout probability inside the residual blocks (training only).
    pub dropout: f64,
    /// Activation; only `"silu"` (alias `"swish"`) is supported.
    pub act_fn: String,
    /// Width of an attention head; `None` (JSON null) means one head as wide as the block's channels.
    pub attention_head_dim: Option<usize>,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Groups of the middle block's attention norm (`None`: `norm_num_groups`).
    pub attn_norm_num_groups: Option<usize>,
    /// Epsilon of every group norm.
    pub norm_eps: f64,
    /// How the time embedding enters a residual block; only `"default"` (added) is supported.
    pub resnet_time_scale_shift: String,
    /// Whether the middle block has self-attention.
    pub add_attention: bool,
    /// Class conditioning; only `None` is supported.
    pub class_embed_type: Option<String>,
    /// Number of classes for class conditioning; only `None` is supported.
    pub num_class_embeds: Option<usize>,
    /// Only used by diffusers' `"learned"` time embedding; kept for round trips.
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNetConfig {
    /// `UNet2DModel.__init__`'s defaults (diffusers 0.42).
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0,
            flip_sin_to_cos: true,
            down_block_types: vec![
                DownBlock2D,
                AttnDownBlock2D,
                AttnDownBlock2D,
                AttnDownBlock2D,
            ],
            mid_block_type: "UNetMidBlock2D".into(),
            up_block_types: vec![AttnUpBlock2D, AttnUpBlock2D, AttnUpBlock2D, UpBlock2D],
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// Reads field `name` of `map`: missing -> `default`; present (even `null`) -> deserialized as `T`, or
/// an error naming the field and the value.
fn field<T: DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
    default: T,
    expected: &str,
) -> Result<T> {
    match map.get(name) {
        None => Ok(default),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::config(name, v, format!("expected {expected} ({e})"))),
    }
}

/// `sample_size` may be an int or an `[h, w]` pair in diffusers; this crate handles square images.
fn sample_size_field(map: &Map<String, Value>) -> Result<Option<usize>> {
    match map.get("sample_size") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            if let Ok(s) = serde_json::from_value::<usize>(v.clone()) {
                return Ok(Some(s));
            }
            match serde_json::from_value::<[usize; 2]>(v.clone()) {
                Ok([h, w]) if h == w => Ok(Some(h)),
                Ok(_) => Err(Error::config(
                    "sample_size",
                    v,
                    "only square images are supported",
                )),
                Err(_) => Err(Error::config(
                    "sample_size",
                    v,
                    "expected an integer or [height, width]",
                )),
            }
        }
    }
}

/// Parses a block type list, naming the field and the unknown type on error.
fn block_types<T: DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
    default: Vec<T>,
    known: &str,
) -> Result<Vec<T>> {
    let Some(v) = map.get(name) else {
        return Ok(default);
    };
    let Value::Array(items) = v else {
        return Err(Error::config(name, v, "expected a list of block types"));
    };
    items
        .iter()
        .map(|item| {
            serde_json::from_value(item.clone()).map_err(|_| {
                Error::config(
                    name,
                    item,
                    format!("unsupported block type (supported: {known})"),
                )
            })
        })
        .collect()
}

impl UNetConfig {
    /// Reads a config from a parsed `config.json` object, filling missing fields with
    /// `UNet2DModel`'s defaults, ignoring unknown fields, then [`validate`](Self::validate)s it.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(Error::config("<root>", value, "expected a JSON object"));
        };
        let d = UNetConfig::default();
        let cfg = UNetConfig {
            sample_size: sample_size_field(map)?,
            in_channels: field(map, "in_channels", d.in_channels, "a positive integer")?,
            out_channels: field(map, "out_channels", d.out_channels, "a positive integer")?,
            center_input_sample: field(
                map,
                "center_input_sample",
                d.center_input_sample,
                "a boolean",
            )?,
            time_embedding_type: field(
                map,
                "time_embedding_type",
                d.time_embedding_type,
                "a string",
            )?,
            time_embedding_dim: field(
                map,
                "time_embedding_dim",
                d.time_embedding_dim,
                "an integer or null",
            )?,
            freq_shift: field(map, "freq_shift", d.freq_shift, "a non-negative integer")?,
            flip_sin_to_cos: field(map, "flip_sin_to_cos", d.flip_sin_to_cos, "a boolean")?,
            down_block_types: block_types(
                map,
                "down_block_types",
                d.down_block_types,
                "DownBlock2D, AttnDownBlock2D",
            )?,
            mid_block_type: field(map, "mid_block_type", d.mid_block_type, "a string")?,
            up_block_types: block_types(
                map,
                "up_block_types",
                d.up_block_types,
                "UpBlock2D, AttnUpBlock2D",
            )?,
            block_out_channels: field(
                map,
                "block_out_channels",
                d.block_out_channels,
                "a list of integers",
            )?,
            layers_per_block: field(
                map,
                "layers_per_block",
                d.layers_per_block,
                "a positive integer",
            )?,
            mid_block_scale_factor: field(
                map,
                "mid_block_scale_factor",
                d.mid_block_scale_factor,
                "a number",
            )?,
            downsample_padding: field(
                map,
                "downsample_padding",
                d.downsample_padding,
                "a non-negative integer",
            )?,
            downsample_type: field(map, "downsample_type", d.downsample_type, "a string")?,
            upsample_type: field(map, "upsample_type", d.upsample_type, "a string")?,
            dropout: field(map, "dropout", d.dropout, "a number")?,
            act_fn: field(map, "act_fn", d.act_fn, "a string")?,
            attention_head_dim: field(
                map,
                "attention_head_dim",
                d.attention_head_dim,
                "an integer or null",
            )?,
            norm_num_groups: field(
                map,
                "norm_num_groups",
                d.norm_num_groups,
                "a positive integer",
            )?,
            attn_norm_num_groups: field(
                map,
                "attn_norm_num_groups",
                d.attn_norm_num_groups,
                "an integer or null",
            )?,
            norm_eps: field(map, "norm_eps", d.norm_eps, "a number")?,
            resnet_time_scale_shift: field(
                map,
                "resnet_time_scale_shift",
                d.resnet_time_scale_shift,
                "a string",
            )?,
            add_attention: field(map, "add_attention", d.add_attention, "a boolean")?,
            class_embed_type: field(
                map,
                "class_embed_type",
                d.class_embed_type,
                "a string or null",
            )?,
            num_class_embeds: field(
                map,
                "num_class_embeds",
                d.num_class_embeds,
                "an integer or null",
            )?,
            num_train_timesteps: field(
                map,
                "num_train_timesteps",
                d.num_train_timesteps,
                "an integer or null",
            )?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses `config.json` text (see [`from_json_value`](Self::from_json_value)).
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s)
            .map_err(|e| Error::config("<root>", "<unparsable>", format!("invalid JSON: {e}")))?;
        Self::from_json_value(&v)
    }

    /// Reads and validates a `config.json` file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.into(),
            source: e,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.into(),
            source: e,
        })?;
        Self::from_json_value(&v).map_err(|e| e.in_file(path))
    }

    /// The config as a JSON object, with diffusers' `_class_name` and `_diffusers_version`.
    pub fn to_json_value(&self) -> Value {
        // Serializing a plain struct of strings, numbers and lists cannot fail.
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("_class_name".into(), Value::String("UNet2DModel".into()));
            map.insert(
                "_diffusers_version".into(),
                Value::String(DIFFUSERS_VERSION.into()),
            );
        }
        v
    }

    /// Writes `config.json` (pretty-printed, diffusers-readable) to `path`.
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text =
            serde_json::to_string_pretty(&self.to_json_value()).map_err(|e| Error::Json {
                path: path.into(),
                source: e,
            })?;
        std::fs::write(path, text + "\n").map_err(|e| Error::Io {
            path: path.into(),
            source: e,
        })
    }

    /// Number of resolution levels (`block_out_channels.len()`).
    pub fn num_levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// What the image height and width must be divisible by: 2^(levels - 1), one halving per
    /// downsampler.
    pub fn size_divisor(&self) -> usize {
        1usize
            << self
                .num_levels()
                .saturating_sub(1)
                .min(usize::BITS as usize - 1)
    }

    /// Width of the time embedding: `time_embedding_dim`, else 4 * `block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Attention head width for a block of `channels` channels: `attention_head_dim`, or `channels`
    /// (one head) when it is null.
    pub fn head_dim(&self, channels: usize) -> usize {
        self.attention_head_dim.unwrap_or(channels)
    }

    /// Groups of the middle block's attention norm: `attn_norm_num_groups`, else `norm_num_groups`.
    pub fn mid_attn_groups(&self) -> usize {
        self.attn_norm_num_groups.unwrap_or(self.norm_num_groups)
    }

    /// Refuses sizes that could not be built or run (a config is data from anywhere: a size bomb must
    /// be an error naming the field, never an allocation failure): at most [`MAX_LEVELS`] levels,
    /// [`MAX_LAYERS_PER_BLOCK`] layers per block, [`MAX_CHANNELS`] channels in any entry,
    /// [`MAX_SAMPLE_SIZE`] pixels a side, and a parameter count below [`MAX_PARAMETERS`] by an upper
    /// bound computed in u128 before anything is built:
    ///
    ///   bound = R (2 * 9 W^2 + W^2 + 4 W) + 2 D (D + W),  W = 2 max(block_out_channels)
    ///
    /// R = levels (2 layers + 1) + 2 residual blocks (down, up and middle), each counted as two 3x3
    /// convolutions and a 1x1 shortcut at width W (which covers the skip concatenations, the
    /// samplers and the attention projections), plus the time embedding's layers (D its width).
    fn check_size(&self) -> Result<()> {
        let bad = |f: &str, v: String, r: String| Err(Error::config(f, v, r));
        let levels = self.block_out_channels.len();
        if levels > MAX_LEVELS {
            return bad("block_out_channels", format!("{levels} entries"), format!("at most {MAX_LEVELS} levels are supported"));
        }
        if self.layers_per_block > MAX_LAYERS_PER_BLOCK {
            return bad("layers_per_block", self.layers_per_block.to_string(), format!("at most {MAX_LAYERS_PER_BLOCK} are supported"));
        }
        let channel_fields = [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("norm_num_groups", self.norm_num_groups)];
        for (field, c) in channel_fields.into_iter().chain(self.block_out_channels.iter().map(|&c| ("block_out_channels", c))) {
            if c > MAX_CHANNELS {
                return bad(field, c.to_string(), format!("at most {MAX_CHANNELS} channels are supported"));
            }
        }
        let temb = self.time_embed_dim();
        if temb > MAX_CHANNELS * 4 {
            return bad("time_embedding_dim", temb.to_string(), format!("at most {} is supported", MAX_CHANNELS * 4));
        }
        if let Some(s) = self.sample_size.filter(|&s| s > MAX_SAMPLE_SIZE) {
            return bad("sample_size", s.to_string(), format!("at most {MAX_SAMPLE_SIZE} pixels a side are supported"));
        }
        // the upper bound on the parameter count (all factors are bounded above, so no overflow in u128)
        let widest = 2 * self.block_out_channels.iter().copied().max().unwrap_or(0) as u128;
        let blocks = levels as u128 * (2 * self.layers_per_block as u128 + 1) + 2;
        let per_block = 2 * widest * widest * 9 + widest * widest + 4 * widest;
        let bound = blocks * per_block + 2 * (temb as u128) * (temb as u128 + widest);
        if bound > MAX_PARAMETERS as u128 {
            return bad(
                "block_out_channels",
                json(&self.block_out_channels),
                format!("with layers_per_block {} the model could have up to {bound} parameters; at most {MAX_PARAMETERS} are supported", self.layers_per_block),
            );
        }
        Ok(())
    }

    /// Checks that the config describes a UNet this crate can build; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: String, r: &str| Err(Error::config(f, v, r));
        if self.time_embedding_type != "positional" {
            return bad(
                "time_embedding_type",
                json(&self.time_embedding_type),
                "only \"positional\" is supported",
            );
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return bad("act_fn", json(&self.act_fn), "only \"silu\" is supported");
        }
        if self.mid_block_type != "UNetMidBlock2D" {
            return bad(
                "mid_block_type",
                json(&self.mid_block_type),
                "only \"UNetMidBlock2D\" is supported",
            );
        }
        if self.downsample_type != "conv" {
            return bad(
                "downsample_type",
                json(&self.downsample_type),
                "only \"conv\" is supported",
            );
        }
        if self.upsample_type != "conv" {
            return bad(
                "upsample_type",
                json(&self.upsample_type),
                "only \"conv\" is supported",
            );
        }
        if self.resnet_time_scale_shift != "default" {
            return bad(
                "resnet_time_scale_shift",
                json(&self.resnet_time_scale_shift),
                "only \"default\" is supported",
            );
        }
        if let Some(c) = &self.class_embed_type {
            return bad(
                "class_embed_type",
                json(c),
                "class conditioning is not supported",
            );
        }
        if let Some(n) = self.num_class_embeds {
            return bad(
                "num_class_embeds",
                n.to_string(),
                "class conditioning is not supported",
            );
        }
        if self.in_channels == 0 {
            return bad("in_channels", "0".into(), "must be positive");
        }
        if self.out_channels == 0 {
            return bad("out_channels", "0".into(), "must be positive");
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block", "0".into(), "must be positive");
        }
        let boc = json(&self.block_out_channels);
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels", boc, "must not be empty");
        }
        self.check_size()?;
        if self.down_block_types.len() != self.block_out_channels.len() {
            return bad(
                "down_block_types",
                json(&self.down_block_types),
                &format!(
                    "needs one entry per block_out_channels entry ({})",
                    self.block_out_channels.len()
                ),
            );
        }
        if self.up_block_types.len() != self.block_out_channels.len() {
            return bad(
                "up_block_types",
                json(&self.up_block_types),
                &format!(
                    "needs one entry per block_out_channels entry ({})",
                    self.block_out_channels.len()
                ),
            );
        }
        if self.norm_num_groups == 0 {
            return bad("norm_num_groups", "0".into(), "must be positive");
        }
        for &c in &self.block_out_channels {
            if c == 0 || c % self.norm_num_groups != 0 {
                return bad(
                    "block_out_channels",
                    boc,
                    &format!(
                        "every entry must be a positive multiple of norm_num_groups ({})",
                        self.norm_num_groups
                    ),
                );
            }
        }
        if let Some(g) = self.attn_norm_num_groups {
            let last = self.block_out_channels[self.block_out_channels.len() - 1];
            if g == 0 || !last.is_multiple_of(g) {
                return bad(
                    "attn_norm_num_groups",
                    g.to_string(),
                    &format!("must divide the last block's channels ({last})"),
                );
            }
        }
        if let Some(h) = self.attention_head_dim {
            let n = self.block_out_channels.len();
            let mut attn_channels: Vec<usize> = Vec::new();
            for (i, t) in self.down_block_types.iter().enumerate() {
                if t.has_attention() {
                    attn_channels.push(self.block_out_channels[i]);
                }
            }
            for (i, t) in self.up_block_types.iter().enumerate() {
                if t.has_attention() {
                    attn_channels.push(self.block_out_channels[n - 1 - i]);
                }
            }
            if self.add_attention {
                attn_channels.push(self.block_out_channels[n - 1]);
            }
            if h == 0 || attn_channels.iter().any(|c| c % h != 0) {
                return bad(
                    "attention_head_dim",
                    h.to_string(),
                    "must divide the channels of every block with attention",
                );
            }
        }
        let half = self.block_out_channels[0] / 2;
        if half <= self.freq_shift {
            return bad(
                "freq_shift",
                self.freq_shift.to_string(),
                &format!("must be below block_out_channels[0] / 2 ({half})"),
            );
        }
        if self.time_embedding_dim == Some(0) {
            return bad("time_embedding_dim", "0".into(), "must be positive");
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return bad("dropout", self.dropout.to_string(), "must be in [0, 1)");
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad("norm_eps", self.norm_eps.to_string(), "must be positive");
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor != 0.0) {
            return bad(
                "mid_block_scale_factor",
                self.mid_block_scale_factor.to_string(),
                "must be a non-zero number",
            );
        }
        if let Some(s) = self.sample_size {
            let div = self.size_divisor();
            if s == 0 || s % div != 0 {
                return bad(
                    "sample_size",
                    s.to_string(),
                    &format!("must be a positive multiple of {div} (2^(levels - 1))"),
                );
            }
        }
        Ok(())
    }
}

/// The most resolution levels a config may have (diffusers' published models have 4 to 6).
pub const MAX_LEVELS: usize = 16;
/// The most residual blocks per level (diffusers' published models have 2).
pub const MAX_LAYERS_PER_BLOCK: usize = 64;
/// The most channels in any one field (diffusers' published models have at most 1280).
pub const MAX_CHANNELS: usize = 1 << 16;
/// The largest `sample_size` (diffusers' published DDPM models are at most 256).
pub const MAX_SAMPLE_SIZE: usize = 1 << 14;
/// The bound on a model's parameter count, 2^33 (32 GiB of f32 weights): a config above it is refused
/// before anything is allocated. The paper's CIFAR-10 model has 35.7M, the 256x256 ones 114M.
pub const MAX_PARAMETERS: u64 = 1 << 33;

/// Any serializable value as compact JSON, for error messages.
fn json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".into())
}

impl<'de> Deserialize<'de> for UNetConfig {
    /// Deserializes through [`UNetConfig::from_json_value`] (diffusers defaults, field-named errors).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(deserializer)?;
        UNetConfig::from_json_value(&v).map_err(serde::de::Error::custom)
    }
}
