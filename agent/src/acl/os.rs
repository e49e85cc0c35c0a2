//! The Windows calls: reading and setting a path's security descriptor, creating a key file
//! private from its first byte.

use std::path::Path;

use windows_permissions::{
    constants::{SeObjectType, SecurityInformation},
    wrappers::{GetNamedSecurityInfo, SetSecurityInfo},
    LocalBox, SecurityDescriptor,
};

use super::{
    policy::{prepare_plan, wsl_dir_sddl, AclError, Prepare, DATA_DIR_SDDL, DATA_FILE_SDDL, KEY_SDDL},
    walk::{self, EntryKind, StdTree, Step, Tree},
};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AclError + '_ {
    move |source| AclError::Io { path: path.to_owned(), source }
}

/// The owner and DACL of `path`, as SDDL.
pub fn read(path: &Path) -> Result<String, AclError> {
    let sd = GetNamedSecurityInfo(
        path.as_os_str(),
        SeObjectType::SE_FILE_OBJECT,
        SecurityInformation::Owner | SecurityInformation::Dacl,
    )
    .map_err(io(path))?;
    let sddl = sd.as_sddl().map_err(io(path))?;
    Ok(sddl.to_string_lossy().into_owned())
}

/// Opens `path` itself for reading and changing its access, never what a link at `path` points
/// at (`FILE_FLAG_OPEN_REPARSE_POINT`; a folder needs `FILE_FLAG_BACKUP_SEMANTICS`).
fn open_itself(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::windows::fs::OpenOptionsExt;
    const READ_CONTROL: u32 = 0x0002_0000;
    const WRITE_DAC: u32 = 0x0004_0000;
    const WRITE_OWNER: u32 = 0x0008_0000;
    const FILE_READ_ATTRIBUTES: u32 = 0x0080;
    const FILE_FLAG_BACKUP_SEMANTICS: u32 = 0x0200_0000;
    const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
    std::fs::OpenOptions::new()
        .access_mode(READ_CONTROL | WRITE_DAC | WRITE_OWNER | FILE_READ_ATTRIBUTES)
        .custom_flags(FILE_FLAG_BACKUP_SEMANTICS | FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)
}

/// Sets the owner (if `sddl` names one) and the DACL of `path` to `sddl`'s, protected from
/// inheritance when `sddl` says `P`. The path is opened as itself and checked through that
/// handle: a link (junction, symbolic link) is refused, never followed, even one swapped in a
/// moment before.
pub fn apply(path: &Path, sddl: &str) -> Result<(), AclError> {
    let sd: LocalBox<SecurityDescriptor> = sddl.parse().map_err(io(path))?;
    let mut info = SecurityInformation::Dacl;
    info |= if sddl.contains("D:P") {
        SecurityInformation::ProtectedDacl
    } else {
        SecurityInformation::UnprotectedDacl
    };
    if sd.owner().is_some() {
        info |= SecurityInformation::Owner;
    }
    let mut file = open_itself(path).map_err(io(path))?;
    if walk::kind_of(&file.metadata().map_err(io(path))?) == EntryKind::Link {
        return Err(AclError::Link { path: path.to_owned() });
    }
    SetSecurityInfo(&mut file, SeObjectType::SE_FILE_OBJECT, info, sd.owner(), None, sd.dacl(), None)
        .map_err(io(path))
}

/// Creates `path` empty, sets [`KEY_SDDL`] on it, and only then hands it back for writing: no
/// byte of the key exists under the folder's inherited access.
pub fn create_private_file(path: &Path) -> Result<std::fs::File, AclError> {
    let file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io(path))?;
    apply(path, KEY_SDDL)?;
    Ok(file)
}

/// Makes `dir` the service's folder: created, or taken in hand, with [`DATA_DIR_SDDL`]; refuses
/// a folder someone else owns unless `take_over`.
pub fn prepare(dir: &Path, take_over: bool) -> Result<Prepare, AclError> {
    let existing = match StdTree.kind(dir).map_err(io(dir))? {
        EntryKind::Missing => None,
        EntryKind::Link => return Err(AclError::Link { path: dir.to_owned() }),
        EntryKind::Dir | EntryKind::File => Some(read(dir)?),
    };
    let plan = prepare_plan(dir, existing.as_deref(), take_over)?;
    match plan {
        Prepare::Create => {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            apply(dir, DATA_DIR_SDDL)?;
            // Until the line above, ProgramData's inherited access let Users create files in
            // it; anything that appeared meanwhile is not ours.
            if let Some(entry) = std::fs::read_dir(dir).map_err(io(dir))?.next() {
                let entry = entry.map_err(io(dir))?;
                return Err(AclError::NotEmpty {
                    path: dir.to_owned(),
                    entry: entry.file_name().to_string_lossy().into_owned(),
                });
            }
        }
        Prepare::Reset => {
            apply(dir, DATA_DIR_SDDL)?;
            reset_tree(dir)?;
        }
    }
    Ok(plan)
}

/// Creates (or resets) `dir\wsl` for the helper run by the user `writer` (a user's SID). A
/// `wsl` that is a link (the writer may turn the folder into a junction) is removed, not
/// followed, and made a real folder again; links inside it are removed.
pub fn prepare_wsl(dir: &Path, writer: &str) -> Result<std::path::PathBuf, AclError> {
    let sddl = wsl_dir_sddl(writer)?;
    let wsl = dir.join("wsl");
    if StdTree.kind(&wsl).map_err(io(&wsl))? == EntryKind::Link {
        walk::remove_link(&wsl).map_err(io(&wsl))?;
        println!("{}: was a link to elsewhere: removed", wsl.display());
    }
    std::fs::create_dir_all(&wsl).map_err(io(&wsl))?;
    apply(&wsl, &sddl)?;
    for step in walk::reset_steps(&StdTree, &wsl).map_err(io(&wsl))? {
        if let Step::RemoveLink(link) = step {
            walk::remove_link(&link).map_err(io(&link))?;
            println!("{}: a link to elsewhere: removed", link.display());
        }
    }
    Ok(wsl)
}

/// Resets everything under `dir` to the service's access without following a link: links are
/// removed (a link that appears between the look and the change is refused by [`apply`]).
fn reset_tree(dir: &Path) -> Result<(), AclError> {
    for step in walk::reset_steps(&StdTree, dir).map_err(io(dir))? {
        match step {
            Step::Dir(path) => apply(&path, DATA_DIR_SDDL)?,
            Step::File(path) => apply(&path, DATA_FILE_SDDL)?,
            Step::RemoveLink(link) => {
                walk::remove_link(&link).map_err(io(&link))?;
                println!("{}: a link to elsewhere: removed", link.display());
            }
        }
    }
    Ok(())
}
