//! A safetensors file of f32 or half-precision tensors that lives in memory through a mapping, not a copy: a
//! stage's teacher features at scale ([n, N, T, d] per block boundary, gigabytes each). The
//! file is laid out first (header, then every tensor's bytes, zero) and written in place
//! through the map as the features are computed; readers index rows of it and the kernel pages
//! in only those, and may evict them again — file pages, not the process's own memory.

use crate::precision::Precision;
use crate::{fsio, Error, Result};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Where one tensor's bytes are in the map.
#[derive(Debug, Clone)]
pub struct Slot {
    pub shape: Vec<usize>,
    pub precision: Precision,
    /// Byte offset from the start of the file.
    pub offset: usize,
    pub len: usize,
}

/// A mapped safetensors file of f32/bf16/f16 tensors.
pub struct MappedTensors {
    map: memmap2::MmapMut,
    slots: BTreeMap<String, Slot>,
    /// The file: while `pending` is set, data is written to that temporary name and renamed
    /// here by `commit`.
    path: PathBuf,
    pending: Option<PathBuf>,
}

impl MappedTensors {
    /// Lay out a new file of zeroed tensors `tensors` (name, shape, precision) for `path` and map it
    /// writable. It is written under a temporary name until `commit`; with `scratch` it has no
    /// name at all (removed once mapped: private to this process, gone when it ends).
    pub fn create(
        path: &Path,
        tensors: &[(String, Vec<usize>, Precision)],
        scratch: bool,
    ) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tensors");
        // Unique within the process too: embedded workers are threads of one process.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{}-{k}", std::process::id()));
        let (header, slots) = layout(tensors);
        let total = slots
            .values()
            .map(|s| s.offset + s.len)
            .max()
            .unwrap_or(header.len());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        fsio::remove_on_signal(&tmp);
        let map = (|| {
            reserve(&file, total as u64)?;
            // SAFETY: the file was just created by this process, which alone writes it.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }?;
            map[..header.len()].copy_from_slice(&header);
            Ok(map)
        })()
        .map_err(|e: std::io::Error| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&tmp, e)
        })?;
        let pending = if scratch {
            std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))?;
            fsio::forget_on_signal(&tmp);
            None
        } else {
            Some(tmp)
        };
        Ok(Self {
            map,
            slots,
            path: path.to_path_buf(),
            pending,
        })
    }

    /// Map an existing safetensors file of f32/bf16/f16 tensors, copy-on-write: reads come from the
    /// file, a write stays private to this process.
    pub fn open(path: &Path) -> Result<Self> {
        crate::checkpoint::regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: a private (copy-on-write) map; fsmerge does not modify a committed file.
        let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
            .map_err(|e| Error::io(path, e))?;
        let slots = {
            let st =
                safetensors::SafeTensors::deserialize(&map).map_err(|e| Error::Checkpoint {
                    file: path.to_path_buf(),
                    msg: format!("not a valid safetensors file ({e})"),
                })?;
            let base = map.as_ptr() as usize;
            let mut slots = BTreeMap::new();
            for (name, view) in st.tensors() {
                let Some(precision) = Precision::of_safetensors(view.dtype()) else {
                    return Err(Error::Tensor {
                        file: path.to_path_buf(),
                        tensor: name,
                        msg: format!("dtype {:?}, expected F32, BF16 or F16", view.dtype()),
                    });
                };
                let data = view.data();
                if !(data.as_ptr() as usize).is_multiple_of(precision.bytes()) {
                    return Err(Error::Tensor {
                        file: path.to_path_buf(),
                        tensor: name,
                        msg: "its data is not aligned to its values".into(),
                    });
                }
                slots.insert(
                    name,
                    Slot {
                        shape: view.shape().to_vec(),
                        precision,
                        offset: data.as_ptr() as usize - base,
                        len: data.len(),
                    },
                );
            }
            slots
        };
        Ok(Self {
            map,
            slots,
            path: path.to_path_buf(),
            pending: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`'s shape, precision and the address of its first byte (aligned to
    /// its values), valid while `self` lives; a missing tensor is an error naming the file.
    pub fn slot(&self, name: &str) -> Result<(&[usize], Precision, *mut u8)> {
        let s = self.slots.get(name).ok_or_else(|| Error::Tensor {
            file: self.path.clone(),
            tensor: name.to_string(),
            msg: "missing from the mapped file".into(),
        })?;
        // SAFETY: offset + len lies inside the map (checked by `layout` or by safetensors).
        let ptr = unsafe { self.map.as_ptr().add(s.offset) } as *mut u8;
        Ok((&s.shape, s.precision, ptr))
    }

    /// Flush the written data and give the file its name (atomically; nothing to do for a
    /// scratch or opened file). The map stays valid.
    pub fn commit(&mut self) -> Result<()> {
        let Some(tmp) = self.pending.take() else {
            return Ok(());
        };
        let done = self
            .map
            .flush()
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        fsio::forget_on_signal(&tmp);
        done.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&self.path, e)
        })
    }
}

impl Drop for MappedTensors {
    /// An uncommitted file is removed: nothing half-written is left under any name.
    fn drop(&mut self) {
        if let Some(tmp) = self.pending.take() {
            let _ = std::fs::remove_file(&tmp);
            fsio::forget_on_signal(&tmp);
        }
    }
}

/// Give `file` `len` bytes of real disk blocks, not a sparse hole: a write through the map into
/// a hole on a full disk would kill the process (SIGBUS) instead of failing here, cleanly.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| std::io::Error::other(format!("{len} bytes is too large a file")))?;
        // SAFETY: a valid descriptor of a file opened for writing.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    file.set_len(len)
}

/// The safetensors header of `tensors` (contiguous, wider values first so every tensor is
/// aligned to its values), padded so the data starts 8-byte aligned, and each tensor's slot.
fn layout(tensors: &[(String, Vec<usize>, Precision)]) -> (Vec<u8>, BTreeMap<String, Slot>) {
    let mut json = serde_json::Map::new();
    let mut at = 0usize;
    let mut relative = Vec::new();
    let mut ordered: Vec<_> = tensors.iter().collect();
    ordered.sort_by_key(|(_, _, p)| std::cmp::Reverse(p.bytes()));
    for (name, shape, precision) in ordered {
        let len = precision.bytes() * shape.iter().product::<usize>();
        let dtype = format!("{:?}", precision.safetensors());
        json.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [at, at + len] }),
        );
        relative.push((name.clone(), shape.clone(), *precision, at, len));
        at += len;
    }
    let mut text = serde_json::Value::Object(json).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut header = (text.len() as u64).to_le_bytes().to_vec();
    header.extend(text);
    let start = header.len();
    let slots = relative
        .into_iter()
        .map(|(name, shape, precision, at, len)| {
            (
                name,
                Slot {
                    shape,
                    precision,
                    offset: start + at,
                    len,
                },
            )
        })
        .collect();
    (header, slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_with_safetensors_and_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        // An odd count of bf16 values before an f32 tensor: the layout keeps both aligned.
        let tensors = vec![
            ("h".to_string(), vec![3], Precision::Bf16),
            ("b".to_string(), vec![2, 3], Precision::Fp32),
            ("a".to_string(), vec![5], Precision::Fp32),
        ];
        let mut m = MappedTensors::create(&path, &tensors, false).unwrap();
        assert!(!path.exists(), "named before commit");
        let (shape, _, ptr) = m.slot("b").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(ptr as usize % 4, 0);
        let (_, precision, h) = m.slot("h").unwrap();
        assert_eq!(precision, Precision::Bf16);
        // SAFETY: slot h holds 3 bf16 values.
        unsafe { std::slice::from_raw_parts_mut(h, 6) }
            .copy_from_slice(&[0, 0x3f, 0x80, 0xbf, 0, 0]);
        // SAFETY: slot b holds 6 floats.
        let b = unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, 6) };
        b.copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        m.commit().unwrap();
        let names = ["a".into(), "b".into(), "h".into()];
        let read = crate::checkpoint::read_tensors(&path, &names).unwrap();
        assert_eq!(read["h"].data, [0.5, -1.0, 0.0]);
        assert_eq!(read["b"].data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(read["a"].data, [0.0; 5]);
        let opened = MappedTensors::open(&path).unwrap();
        let (shape, _, ptr) = opened.slot("b").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(unsafe { *(ptr as *const f32).add(5) }, 6.0);
        assert!(opened.slot("c").unwrap_err().to_string().contains("`c`"));
    }

    #[test]
    fn uncommitted_and_scratch_files_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = vec![("x".to_string(), vec![4], Precision::Fp32)];
        drop(MappedTensors::create(&dir.path().join("a.safetensors"), &t, false).unwrap());
        let scratch = MappedTensors::create(&dir.path().join("b.safetensors"), &t, true).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        drop(scratch);
    }
}
