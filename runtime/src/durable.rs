//! Making a rename last: after a file is renamed into place, its directory is flushed too, or a
//! power cut may bring back the old name. And the one way to write a file, private or not.

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

/// Who may read a file written by [`write_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// As the process's umask and the folder say.
    Public,
    /// Its owner only: mode 0600 on Unix, also when the file existed with another mode.
    Private,
}

/// Creates a private file in a platform's own way (see [`write_file`]).
pub type CreatePrivate<'a> = &'a dyn Fn(&Path) -> std::io::Result<std::fs::File>;

/// Writes `contents` to `path` (created or truncated) and flushes it to disk, so a rename that
/// puts it in place afterwards never exposes a partial file. A private file is created private
/// (mode 0600 on Unix); `create_private`, if given, creates it instead (the Windows agent gives a
/// key its own access descriptor while the file is still empty).
pub fn write_file(
    path: &Path,
    contents: &[u8],
    access: Access,
    create_private: Option<CreatePrivate<'_>>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = match (access, create_private) {
        (Access::Private, Some(create)) => create(path)?,
        _ => options.open(path)?,
    };
    // A file that existed keeps its old mode through `open`: a private one is made private either way.
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

/// Replaces `path` with `contents` as a private file: written whole to a temporary file beside
/// it, renamed over it, the rename flushed; the folder is created if it is missing.
pub fn replace_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)?;
    }
    let tmp = path.with_extension("tmp");
    write_file(&tmp, contents, Access::Private, None)?;
    std::fs::rename(&tmp, path)?;
    sync_parent_dir(path)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_private_file_is_private_even_when_it_existed_open_to_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_file(&path, b"new", Access::Private, None).expect("private");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!((mode, std::fs::read_to_string(&path).expect("read")), (0o600, "new".to_owned()));
    }
}
