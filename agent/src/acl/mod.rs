//! Who may change the service's files. The service runs as LocalSystem and does what `agent.toml`
//! says (dial targets, start containers with host mounts through Docker), so its folder, its config
//! and its identity must be writable by SYSTEM and Administrators only, and the program it runs
//! must not be replaceable by a standard user.
//!
//! Windows describes access as a security descriptor, written as SDDL text
//! (`O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)`). This module reads that text and decides; it is plain
//! code, unit-tested on every platform. Reading and setting a path's descriptor
//! ([`read`], [`apply`]) are Windows calls, through the `windows-permissions` crate.

#[cfg(windows)]
mod os;
mod policy;
pub mod walk;

#[cfg(windows)]
pub use os::{apply, create_private_file, prepare, prepare_wsl, read};
pub use policy::{
    binary_checks, check_private, prepare_plan, start_checks, start_fix, wsl_dir_sddl, Ace, AclError,
    Descriptor, Kind, Prepare, SddlError, BINARY_FIX, DATA_DIR_SDDL, DATA_FILE_SDDL, KEY_SDDL,
};
