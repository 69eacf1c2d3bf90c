//! The `datasets` ImageFolder convention: `<root>/<class name>/*.png|jpg|jpeg` (the class
//! folder's name is the label), or images directly in `<root>` (unlabeled). Files are read in
//! sorted order, so a run sees the same rows every time.

use super::{Input, Label, Record};
use fsmerge_common::{Error, Result};
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The images under `root` (at most `limit`), class folders in name order.
pub fn read(root: &Path, limit: usize) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (label, file) in listing(root)? {
        if out.len() == limit {
            break;
        }
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        out.push(Record {
            input: Input::Image(bytes),
            label: label.map(Label::Name),
            origin: file.display().to_string(),
        });
    }
    Ok(out)
}

/// Every image file under `root`, in reading order.
pub fn files(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(listing(root)?.into_iter().map(|(_, f)| f).collect())
}

/// (class folder name, image file) of every image, sorted; loose images have no class.
fn listing(root: &Path) -> Result<Vec<(Option<String>, PathBuf)>> {
    let mut out = Vec::new();
    for entry in sorted_entries(root)? {
        if entry.is_dir() {
            let class = entry
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for file in sorted_entries(&entry)? {
                if is_image(&file) {
                    out.push((Some(class.clone()), file));
                }
            }
        } else if is_image(&entry) {
            out.push((None, entry));
        }
    }
    Ok(out)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn is_image(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
}
