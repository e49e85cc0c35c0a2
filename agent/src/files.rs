//! The agent's own files (identity, configuration): written whole and flushed, a key private
//! (on Windows with its own access descriptor from its first byte).

use std::path::Path;

/// Writes `contents` to `path` and flushes it; a private file is readable by its owner only.
pub(crate) fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    use sallyport_runtime::durable::{self, Access};
    let access = if private { Access::Private } else { Access::Public };
    // On Windows a key gets its own descriptor (SYSTEM, Administrators, its owner) while the file
    // is still empty, whatever the folder would pass on to it.
    #[cfg(windows)]
    let create: Option<durable::CreatePrivate<'_>> =
        Some(&|path| crate::acl::create_private_file(path).map_err(std::io::Error::other));
    #[cfg(not(windows))]
    let create = None;
    durable::write_file(path, contents.as_bytes(), access, create)
}
