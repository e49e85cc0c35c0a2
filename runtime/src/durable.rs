//! Making a rename last: after a file is renamed into place, its directory is flushed too, or a
//! power cut may bring back the old name.

use std::path::Path;

/// Flushes the directory that holds `path` to disk (Unix; elsewhere the rename is what there is).
pub fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
