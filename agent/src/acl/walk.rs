//! Walking the service's folder without following links. The `wsl` folder is writable by a
//! standard user (the WSL helper's), who could turn it, or anything in it, into a junction or a
//! symbolic link to another folder; a SYSTEM process that followed it would rewrite the access of
//! whatever it points at. So every entry is looked at as itself (`symlink_metadata`, and on
//! Windows the reparse-point attribute, which junctions and mount points carry), folders are
//! entered only when they are real, and a link found inside is removed, never followed.
//!
//! The decisions are plain code over [`Tree`], tested on every platform with real links where
//! the platform makes them; the Windows calls that apply access by handle are in `os.rs`.

use std::{
    io,
    path::{Path, PathBuf},
};

/// What a path is, looked at without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    /// A symbolic link, a junction or any other reparse point: never followed.
    Link,
    Missing,
}

/// One step of resetting a folder's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A real folder: the service's folder access.
    Dir(PathBuf),
    /// A real file: the service's file access.
    File(PathBuf),
    /// A link someone made: removed (the link, not what it points at).
    RemoveLink(PathBuf),
}

/// The file system as the walk sees it.
pub trait Tree {
    /// What `path` is, without following it.
    fn kind(&self, path: &Path) -> io::Result<EntryKind>;
    /// The entries of the real folder `dir`.
    fn entries(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The steps that reset everything under the real folder `dir` (not `dir` itself), parents before
/// their contents; links are removed and never entered.
pub fn reset_steps(tree: &impl Tree, dir: &Path) -> io::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(folder) = pending.pop() {
        let mut entries = tree.entries(&folder)?;
        entries.sort();
        for path in entries {
            match tree.kind(&path)? {
                EntryKind::Dir => {
                    steps.push(Step::Dir(path.clone()));
                    pending.push(path);
                }
                EntryKind::File => steps.push(Step::File(path)),
                EntryKind::Link => steps.push(Step::RemoveLink(path)),
                EntryKind::Missing => {}
            }
        }
    }
    Ok(steps)
}

/// The real file system, looked at through `symlink_metadata`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdTree;

/// The reparse-point file attribute (winnt.h): junctions, mount points, symbolic links.
pub const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;

impl Tree for StdTree {
    fn kind(&self, path: &Path) -> io::Result<EntryKind> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(EntryKind::Missing),
            Err(e) => return Err(e),
        };
        Ok(kind_of(&meta))
    }

    fn entries(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?.map(|entry| entry.map(|e| e.path())).collect()
    }
}

/// What metadata read without following says a path is.
pub fn kind_of(meta: &std::fs::Metadata) -> EntryKind {
    if meta.file_type().is_symlink() || reparse_point(meta) {
        EntryKind::Link
    } else if meta.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File
    }
}

#[cfg(windows)]
fn reparse_point(meta: &std::fs::Metadata) -> bool {
    use std::os::windows::fs::MetadataExt;
    meta.file_attributes() & FILE_ATTRIBUTE_REPARSE_POINT != 0
}

#[cfg(not(windows))]
fn reparse_point(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Removes the link at `path` itself (a folder link or junction with `remove_dir`, which does not
/// follow it; a file link with `remove_file`).
pub fn remove_link(path: &Path) -> io::Result<()> {
    std::fs::remove_dir(path).or_else(|_| std::fs::remove_file(path))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A file system in a map: path -> kind; a folder's entries are the paths right under it.
    struct Map(BTreeMap<PathBuf, EntryKind>);

    impl Tree for Map {
        fn kind(&self, path: &Path) -> io::Result<EntryKind> {
            Ok(self.0.get(path).copied().unwrap_or(EntryKind::Missing))
        }
        fn entries(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            assert_eq!(self.kind(dir)?, EntryKind::Dir, "only real folders are entered: {}", dir.display());
            Ok(self.0.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
        }
    }

    #[test]
    fn links_are_removed_and_never_entered() {
        use EntryKind::*;
        let tree = Map(BTreeMap::from([
            (PathBuf::from("/d"), Dir),
            (PathBuf::from("/d/agent.toml"), File),
            (PathBuf::from("/d/wsl"), Dir),
            (PathBuf::from("/d/wsl/Ubuntu.addr"), File),
            (PathBuf::from("/d/wsl/evil"), Link),
            // What the link points at is not under it in the walk, and never visited.
            (PathBuf::from("/d/logs"), Link),
        ]));
        let steps = reset_steps(&tree, Path::new("/d")).expect("steps");
        assert_eq!(
            steps,
            [
                Step::File("/d/agent.toml".into()),
                Step::RemoveLink("/d/logs".into()),
                Step::Dir("/d/wsl".into()),
                Step::File("/d/wsl/Ubuntu.addr".into()),
                Step::RemoveLink("/d/wsl/evil".into()),
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn real_symbolic_links_are_seen_as_links_and_their_targets_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        let (dir, elsewhere) = (root.path().join("Sallyport"), root.path().join("Program Files"));
        std::fs::create_dir_all(dir.join("wsl")).expect("dirs");
        std::fs::create_dir_all(&elsewhere).expect("dirs");
        std::fs::write(elsewhere.join("sallyport-agent.exe"), b"exe").expect("file");
        std::os::unix::fs::symlink(&elsewhere, dir.join("wsl").join("junction")).expect("link");
        std::os::unix::fs::symlink(elsewhere.join("sallyport-agent.exe"), dir.join("file-link"))
            .expect("link");
        let steps = reset_steps(&StdTree, &dir).expect("steps");
        assert!(steps.contains(&Step::RemoveLink(dir.join("wsl").join("junction"))), "{steps:?}");
        assert!(steps.contains(&Step::RemoveLink(dir.join("file-link"))), "{steps:?}");
        assert!(
            steps.iter().all(|s| !matches!(s, Step::Dir(p) | Step::File(p) if p.starts_with(&elsewhere))),
            "nothing behind a link is visited: {steps:?}"
        );
        for step in &steps {
            if let Step::RemoveLink(link) = step {
                remove_link(link).expect("remove the link");
            }
        }
        assert!(elsewhere.join("sallyport-agent.exe").exists(), "the target survives");
        assert_eq!(StdTree.kind(&dir.join("wsl").join("junction")).expect("kind"), EntryKind::Missing);
        assert_eq!(StdTree.kind(&dir.join("wsl")).expect("kind"), EntryKind::Dir);
    }
}
