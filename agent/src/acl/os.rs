//! The Windows calls: reading and setting a path's security descriptor, creating a key file
//! private from its first byte.

use std::path::Path;

use windows_permissions::{
    constants::{SeObjectType, SecurityInformation},
    wrappers::{GetNamedSecurityInfo, SetNamedSecurityInfo},
    LocalBox, SecurityDescriptor,
};

use super::policy::{prepare_plan, wsl_dir_sddl, AclError, Prepare, DATA_DIR_SDDL, DATA_FILE_SDDL, KEY_SDDL};

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

/// Sets the owner (if `sddl` names one) and the DACL of `path` to `sddl`'s, protected from
/// inheritance when `sddl` says `P`.
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
    SetNamedSecurityInfo(
        path.as_os_str(),
        SeObjectType::SE_FILE_OBJECT,
        info,
        sd.owner(),
        None,
        sd.dacl(),
        None,
    )
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
    let existing = if dir.exists() { Some(read(dir)?) } else { None };
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

/// Creates (or resets) `dir\wsl` for the helper run by the user `writer` (a SID).
pub fn prepare_wsl(dir: &Path, writer: &str) -> Result<std::path::PathBuf, AclError> {
    let sddl = wsl_dir_sddl(writer)?;
    let wsl = dir.join("wsl");
    std::fs::create_dir_all(&wsl).map_err(io(&wsl))?;
    apply(&wsl, &sddl)?;
    Ok(wsl)
}

fn reset_tree(dir: &Path) -> Result<(), AclError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            apply(&path, DATA_DIR_SDDL)?;
            reset_tree(&path)?;
        } else {
            apply(&path, DATA_FILE_SDDL)?;
        }
    }
    Ok(())
}
