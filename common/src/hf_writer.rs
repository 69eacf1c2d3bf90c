//! An HF model folder's weights written tensor by tensor as they come, never the whole model in
//! memory: safetensors shards of at most `max_shard_bytes`, named and indexed as `transformers`'
//! `save_pretrained` names them (`model-00001-of-00003.safetensors` …,
//! `model.safetensors.index.json` with the total size and every tensor's file), or one
//! `model.safetensors` when everything fits in one shard. Each file is written atomically;
//! the folder itself is made atomic by the caller's staging directory.

use crate::checkpoint::{write_json, HostTensor};
use crate::precision::Precision;
use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// `transformers`' default `max_shard_size` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The shard being filled: its tensors' bytes go to a data file as they come; the header
/// (names, shapes, offsets) is written in front when the shard closes.
struct OpenShard {
    data_path: PathBuf,
    data: BufWriter<std::fs::File>,
    /// (name, shape, begin, end) in arrival order.
    entries: Vec<(String, Vec<usize>, u64, u64)>,
    bytes: u64,
}

pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    open: Option<OpenShard>,
    /// Shards written so far (under temporary names until `finish` knows their count), with
    /// the names of their tensors.
    written: Vec<(PathBuf, Vec<String>)>,
    names: BTreeSet<String>,
    total_bytes: u64,
    /// What the tensors are written in (`with_precision`; fp32 by default).
    precision: Precision,
}

impl ShardedWriter {
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            open: None,
            written: Vec::new(),
            names: BTreeSet::new(),
            total_bytes: 0,
            precision: Precision::Fp32,
        })
    }

    /// Write every tensor in `precision` (rounded to nearest even).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Add one tensor, written to disk at once; the shard being filled is closed first when
    /// this one would take it past the limit (a tensor larger than the limit gets a shard of
    /// its own).
    pub fn add(&mut self, name: String, t: HostTensor) -> Result<()> {
        if self.names.contains(&name) {
            return Err(Error::Tensor {
                file: self.dir.clone(),
                tensor: name,
                msg: "written twice".into(),
            });
        }
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::Tensor {
                file: self.dir.clone(),
                tensor: name,
                msg: format!("shape {:?} but {} values", t.shape, t.data.len()),
            });
        }
        let bytes = (self.precision.bytes() * t.data.len()) as u64;
        let full = self
            .open
            .as_ref()
            .is_some_and(|o| !o.entries.is_empty() && o.bytes + bytes > self.max_shard_bytes);
        if full {
            self.close_shard()?;
        }
        let shard = match &mut self.open {
            Some(o) => o,
            None => self.open.insert(self.new_shard()?),
        };
        let io = |e| Error::io(&shard.data_path, e);
        // Encoded a block of values at a time: no second copy of a whole tensor.
        let mut encoded = Vec::new();
        for block in t.data.chunks(1 << 16) {
            encoded.clear();
            for &v in block {
                self.precision.encode(v, &mut encoded);
            }
            shard.data.write_all(&encoded).map_err(io)?;
        }
        shard
            .entries
            .push((name.clone(), t.shape, shard.bytes, shard.bytes + bytes));
        shard.bytes += bytes;
        self.total_bytes += bytes;
        self.names.insert(name);
        Ok(())
    }

    fn new_shard(&self) -> Result<OpenShard> {
        let data_path = self
            .dir
            .join(format!(".shard-{}.data.tmp", self.written.len() + 1));
        let file = std::fs::File::create(&data_path).map_err(|e| Error::io(&data_path, e))?;
        Ok(OpenShard {
            data_path,
            data: BufWriter::new(file),
            entries: Vec::new(),
            bytes: 0,
        })
    }

    /// Write the open shard as a safetensors file: its header, then its data file's bytes.
    fn close_shard(&mut self) -> Result<()> {
        let shard = match self.open.take() {
            Some(s) => s,
            None => self.new_shard()?,
        };
        let file = self
            .dir
            .join(format!(".shard-{}.tmp", self.written.len() + 1));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| Error::io(&p, e)
        };
        shard
            .data
            .into_inner()
            .map_err(|e| Error::io(&shard.data_path, e.into_error()))?
            .sync_all()
            .map_err(io(&shard.data_path))?;
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let dtype = format!("{:?}", self.precision.safetensors());
        for (name, shape, begin, end) in &shard.entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}),
            );
        }
        let mut header = serde_json::to_vec(&header)
            .map_err(|e| Error::Compute(format!("safetensors header: {e}")))?;
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut out = std::fs::File::create(&file).map_err(io(&file))?;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header))
            .map_err(io(&file))?;
        let mut data = std::fs::File::open(&shard.data_path).map_err(io(&shard.data_path))?;
        std::io::copy(&mut data, &mut out).map_err(io(&file))?;
        out.sync_all().map_err(io(&file))?;
        std::fs::remove_file(&shard.data_path).map_err(io(&shard.data_path))?;
        let names = shard.entries.into_iter().map(|(n, ..)| n).collect();
        self.written.push((file, names));
        Ok(())
    }

    /// Write the last shard and name the files: `model.safetensors` for one shard, else the
    /// numbered shards and their index. Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if self.open.is_some() || self.written.is_empty() {
            self.close_shard()?;
        }
        let count = self.written.len();
        let rename = |from: &Path, to: PathBuf| -> Result<PathBuf> {
            std::fs::rename(from, &to).map_err(|e| Error::io(&to, e))?;
            Ok(to)
        };
        if count == 1 {
            let (file, _) = &self.written[0];
            return Ok(vec![rename(file, self.dir.join("model.safetensors"))?]);
        }
        let mut files = Vec::new();
        let mut weight_map = BTreeMap::new();
        for (i, (file, names)) in self.written.iter().enumerate() {
            let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            for n in names {
                weight_map.insert(n.clone(), name.clone());
            }
            files.push(rename(file, self.dir.join(&name))?);
        }
        let index = self.dir.join("model.safetensors.index.json");
        write_json(
            &index,
            &serde_json::json!({
                "metadata": {"total_size": self.total_bytes},
                "weight_map": weight_map,
            }),
        )?;
        files.push(index);
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::WeightFiles;

    fn tensor(n: usize, v: f32) -> HostTensor {
        HostTensor::new(vec![n], vec![v; n])
    }

    #[test]
    fn shards_above_the_limit_and_indexes_them() {
        let dir = tempfile::tempdir().unwrap();
        // 40 bytes a shard: tensors of 24, 24, 8, 48 bytes → [a], [b, c], [d].
        let mut w = ShardedWriter::new(dir.path(), 40).unwrap();
        for (name, n) in [("a", 6), ("b", 6), ("c", 2), ("d", 12)] {
            w.add(name.into(), tensor(n, n as f32)).unwrap();
        }
        let files = w.finish().unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let index: serde_json::Value =
            crate::checkpoint::read_json(&dir.path().join("model.safetensors.index.json")).unwrap();
        assert_eq!(index["metadata"]["total_size"], 104);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
        let all = WeightFiles::open(dir.path())
            .unwrap()
            .read(&["a", "b", "c", "d"].map(String::from))
            .unwrap();
        assert_eq!(all["d"].data, vec![12.0; 12]);
        assert_eq!(all["c"].shape, vec![2]);
        // Nothing but the model files is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }

    #[test]
    fn one_shard_is_model_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardedWriter::new(dir.path(), 1000).unwrap();
        w.add("a".into(), tensor(3, 1.0)).unwrap();
        w.add("b".into(), tensor(3, 2.0)).unwrap();
        assert!(w.add("a".into(), tensor(3, 1.0)).is_err());
        let files = w.finish().unwrap();
        assert_eq!(files, vec![dir.path().join("model.safetensors")]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
