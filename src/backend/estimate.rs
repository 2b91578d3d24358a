//! What a model will hold in memory, from its files' headers alone: no weight is read.
//!
//! - A GGUF file: its tensor infos (name, shape, ggml type), each counted at the size MLX keeps
//!   it in: Q4_0/Q4_1 as 4-bit with a float16 scale and bias per 32 values, Q8_0 as 8-bit the
//!   same way, F32 as 4 bytes, F16/BF16 as 2, anything else as float16 (MLX dequantises it).
//! - A folder: its `*.safetensors` headers (dtype and shape of every tensor).
//!
//! The KV cache comes on top: `max_concurrent` sequences of `context` tokens, from the layer
//! count, KV heads and head size in the metadata (or `config.json`).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why a model's headers could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// A file or folder cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what its name or place says.
    #[error("{}: not a readable {format} file: {problem}", path.display())]
    Format {
        /// Which.
        path: PathBuf,
        /// `GGUF` or `safetensors`.
        format: &'static str,
        /// What was found.
        problem: String,
    },
    /// A file that is neither a GGUF file nor a folder.
    #[error("{} is a file but not a GGUF file", .0.display())]
    NotGguf(PathBuf),
}

/// A model that would take memory to the warning threshold; says so with the numbers.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "model `{model}` would not fit: it needs about {:.2} GB ({:.2} GB of weights from {}, plus KV cache \
     for {sequences} sequences of {context} tokens), and {:.2} GB is available; loading it would leave \
     {:.2} GB, at or below memory.warning_gb ({:.2} GB). Nothing was loaded. Use a smaller model, \
     lower backend.max_concurrent or backend.kv_context_tokens, or load it anyway with --force \
     (backend.force_load)",
    gb(*need), gb(*weights), files.display(), gb(*available), gb(available.saturating_sub(*need)), gb(*warning)
)]
pub struct NoFit {
    /// The model's name.
    pub model: String,
    /// Bytes it needs, weights and KV cache.
    pub need: u64,
    /// Of those, weights.
    pub weights: u64,
    /// The files its size was read from.
    pub files: PathBuf,
    /// Sequences of KV cache counted.
    pub sequences: u64,
    /// Tokens per sequence counted.
    pub context: u64,
    /// Memory available.
    pub available: u64,
    /// `memory.warning_gb`, in bytes.
    pub warning: u64,
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / crate::memory::GIB
}

/// What a model needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// The files read.
    pub source: PathBuf,
    /// Weights as MLX holds them.
    pub weight_bytes: u64,
    /// KV cache bytes per token of one sequence (0 when the shape is unknown).
    pub kv_bytes_per_token: u64,
}

impl Estimate {
    /// Weights plus the KV cache of `sequences` sequences of `context` tokens.
    pub fn total(&self, sequences: u64, context: u64) -> u64 {
        self.weight_bytes.saturating_add(
            self.kv_bytes_per_token
                .saturating_mul(sequences)
                .saturating_mul(context),
        )
    }
}

/// The model at `path` (a GGUF file, a folder holding one, or an MLX/Hugging Face folder);
/// `Ok(None)` when there is nothing local to read (a Hugging Face id, the demo).
pub fn estimate(path: &Path) -> Result<Option<Estimate>, EstimateError> {
    if path.is_file() {
        return if is_gguf(path) {
            gguf(path).map(Some)
        } else {
            Err(EstimateError::NotGguf(path.to_owned()))
        };
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| EstimateError::Io {
            path: path.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let ggufs: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    if !path.join("config.json").exists() && ggufs.len() == 1 {
        return gguf(ggufs[0]).map(Some);
    }
    let tensors: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if tensors.is_empty() {
        return Ok(None);
    }
    let mut weight_bytes = 0;
    for file in tensors {
        weight_bytes += safetensors(file)?;
    }
    Ok(Some(Estimate {
        source: path.to_owned(),
        weight_bytes,
        kv_bytes_per_token: kv_from_config(&path.join("config.json")).unwrap_or(0),
    }))
}

pub use crate::config::model_path;

/// Refuses a model whose estimate, with the KV cache of `sequences` × `context` tokens, would
/// take `available` memory to `warning` or below; the message names the model, the estimate,
/// the memory available and the threshold.
pub fn check_fits(
    model: &str,
    estimate: &Estimate,
    sequences: u64,
    context: u64,
    available: u64,
    warning: u64,
) -> Result<(), NoFit> {
    let need = estimate.total(sequences, context);
    if available.saturating_sub(need) > warning {
        return Ok(());
    }
    Err(NoFit {
        model: model.to_owned(),
        need,
        weights: estimate.weight_bytes,
        files: estimate.source.clone(),
        sequences,
        context,
        available,
        warning,
    })
}

fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// A safetensors file's tensor bytes, from its header.
fn safetensors(path: &Path) -> Result<u64, EstimateError> {
    let bad = |why: String| EstimateError::Format {
        path: path.to_owned(),
        format: "safetensors",
        problem: why,
    };
    let mut f = File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    Ok(header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| {
            let offsets = t.get("data_offsets")?.as_array()?;
            Some(offsets.get(1)?.as_u64()?.saturating_sub(offsets.first()?.as_u64()?))
        })
        .sum())
}

fn kv_from_config(path: &Path) -> Option<u64> {
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let get = |k: &str| c.get(k).and_then(|v| v.as_u64());
    let layers = get("num_hidden_layers")?;
    let heads = get("num_attention_heads")?;
    let kv_heads = get("num_key_value_heads").unwrap_or(heads);
    let head_dim = get("head_dim").unwrap_or(get("hidden_size")? / heads.max(1));
    // Keys and values, float32 on a CPU (the larger case).
    Some(2 * layers * kv_heads * head_dim * 4)
}

// === GGUF ===

/// MLX's bytes per 1000 values of a ggml type (see the module docs).
fn mlx_millibytes(ggml_type: u32) -> u64 {
    match ggml_type {
        0 => 4000,      // F32
        1 | 30 => 2000, // F16, BF16
        2 | 3 => 625,   // Q4_0, Q4_1: 4 bits + a float16 scale and bias per 32
        8 => 1125,      // Q8_0
        _ => 2000,      // dequantised to float16
    }
}

struct Reader<R> {
    r: R,
    path: PathBuf,
}

impl<R: Read + Seek> Reader<R> {
    fn err(&self, why: impl std::fmt::Display) -> EstimateError {
        EstimateError::Format {
            path: self.path.clone(),
            format: "GGUF",
            problem: why.to_string(),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], EstimateError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| self.err(e))?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, EstimateError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, EstimateError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String, EstimateError> {
        let len = self.u64()?;
        if len > 1 << 20 {
            return Err(self.err(format!("a string of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        self.r.read_exact(&mut b).map_err(|e| self.err(e))?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip(&mut self, n: u64) -> Result<(), EstimateError> {
        self.r.seek(SeekFrom::Current(n as i64)).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A metadata value: numbers as u64 where they are integers, strings kept, arrays skipped.
    fn value(&mut self, kind: u32) -> Result<Option<u64>, EstimateError> {
        Ok(match kind {
            0 | 1 | 7 => Some(self.bytes::<1>()?[0] as u64),
            2 | 3 => Some(u16::from_le_bytes(self.bytes()?) as u64),
            4 | 5 => Some(self.u32()? as u64),
            6 => {
                self.skip(4)?;
                None
            }
            10 | 11 => Some(self.u64()?),
            12 => {
                self.skip(8)?;
                None
            }
            8 => {
                self.string()?;
                None
            }
            9 => {
                let (item, len) = (self.u32()?, self.u64()?);
                match item {
                    0 | 1 | 7 => self.skip(len)?,
                    2 | 3 => self.skip(len * 2)?,
                    4..=6 => self.skip(len * 4)?,
                    10..=12 => self.skip(len * 8)?,
                    8 => {
                        for _ in 0..len {
                            self.string()?;
                        }
                    }
                    other => return Err(self.err(format!("an array of type {other}"))),
                }
                None
            }
            other => return Err(self.err(format!("a value of type {other}"))),
        })
    }
}

fn gguf(path: &Path) -> Result<Estimate, EstimateError> {
    let file = File::open(path).map_err(|source| EstimateError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut r = Reader {
        r: BufReader::new(file),
        path: path.to_owned(),
    };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(r.err("no GGUF magic"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.err(format!("version {version}")));
    }
    let (tensors, kvs) = (r.u64()?, r.u64()?);
    if tensors > 1 << 24 || kvs > 1 << 24 {
        return Err(r.err(format!("{tensors} tensors and {kvs} metadata entries")));
    }
    let mut meta = std::collections::HashMap::new();
    for _ in 0..kvs {
        let key = r.string()?;
        let kind = r.u32()?;
        if let Some(v) = r.value(kind)? {
            meta.insert(key, v);
        }
    }
    let mut weight_bytes: u64 = 0;
    for _ in 0..tensors {
        r.string()?;
        let dims = r.u32()?;
        if dims > 8 {
            return Err(r.err(format!("a tensor of {dims} dimensions")));
        }
        let mut values: u64 = 1;
        for _ in 0..dims {
            values = values.saturating_mul(r.u64()?);
        }
        let kind = r.u32()?;
        r.u64()?; // offset
        weight_bytes = weight_bytes.saturating_add(values.saturating_mul(mlx_millibytes(kind)) / 1000);
    }
    let layer_key = |suffix: &str| meta.iter().find(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v);
    let kv_bytes_per_token = match (
        layer_key(".block_count"),
        layer_key(".attention.head_count"),
        layer_key(".embedding_length"),
    ) {
        (Some(layers), Some(heads), Some(width)) if heads > 0 => {
            let kv_heads = layer_key(".attention.head_count_kv").unwrap_or(heads);
            let head_dim = layer_key(".attention.key_length").unwrap_or(width / heads);
            2 * layers * kv_heads * head_dim * 4
        }
        _ => 0,
    };
    Ok(Estimate {
        source: path.to_owned(),
        weight_bytes,
        kv_bytes_per_token,
    })
}

#[cfg(test)]
mod tests;
